"""`gpupack run --state-dir DIR`: the live database on node-local disk, for file systems where even
one host's SQLite is slow (Lustre, GPFS: every commit's fsync and lock goes to a server).

The run directory's state.db stays the run's record that every other host and every later run
reads: publish.Publisher copies the live database there with SQLite's online backup at every tick
(at most as often as a tenth of the time a copy takes) and at the end. At the start, under the run
lock, the live database is restored from the run directory's copy, unless this node still has a
newer one (a scheduler killed here after its last copy); then the run directory's -wal/-shm, if
any, are removed: they belong to a WAL database that the copies replace, and SQLite would apply
them to the copy.

What a kill -9 may lose: the changes of the last tick that were not yet copied back. A requeued job
on another node recovers from the copy (recovery.py: a scheduler on another host), so an
experiment launched in that last tick may run again.
"""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

from .reader import open_file
from .store import Store, StoreError


class StateDirError(Exception):
    """The state directory cannot be used: one line for the user."""


def live_path(state_dir: Path, run_dir: Path) -> Path:
    """One file per run directory, named so that two runs sharing a node never share a database."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return Path(state_dir) / f"gpupack-{Path(run_dir).name}-{digest}.db"


def _progress(path: Path) -> tuple[int, int]:
    """(last run id, last event id): how far a database got; every scheduler start adds a run and
    every state change an event."""
    try:
        with closing(open_file(path, writer_here=False)) as store:
            runs = store.runs()
            last = store.events(limit=1)
            return (int(str(runs[-1]["id"])) if runs else 0, last[-1].id if last else 0)
    except (StoreError, sqlite3.Error, OSError):
        return (-1, -1)


def prepare(state_dir: Path, run_dir: Path) -> Path:
    """Called under the run lock, before the store is opened: the live database's path, restored."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"--state-dir {state_dir}: cannot create it: {exc.strerror}") from None
    live = live_path(state_dir, run_dir)
    shared = Path(run_dir) / "state.db"
    if shared.is_file() and (not live.is_file() or _progress(shared) >= _progress(live)):
        try:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{live}{suffix}").unlink(missing_ok=True)
            with closing(open_file(shared, writer_here=False)) as store:
                store.backup_to(live)
        except (OSError, sqlite3.Error, StoreError) as exc:
            raise StateDirError(f"--state-dir {state_dir}: cannot copy {shared} there: {exc}") from None
    for suffix in ("-wal", "-shm"):
        Path(f"{shared}{suffix}").unlink(missing_ok=True)
    return live


def finish(live: Path, copied: bool) -> None:
    """After the last copy back: the node-local database is no longer needed (a later run restores
    from the run directory). Kept when the last copy failed: it is then the only full record."""
    if copied:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{live}{suffix}").unlink(missing_ok=True)
