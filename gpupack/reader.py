"""How `status`, `watch`, `results` and `report` read a run, from whatever host they are on.

The rule (README "The run directory"):
- the scheduler is alive on another host (status.json's heartbeat is fresh and names another
  host): read what it publishes (publish.py) and never open its WAL database, whose -shm index
  is not shared across hosts;
- it is alive on this host: its database, read-only (WAL readers on one host are safe);
- no scheduler is alive: the database, opened without WAL side effects: `immutable=1` when no
  -wal file is left (a finished run: no lock, no -shm, nothing written, a read-only directory is
  enough); with a -wal left by a killed scheduler, a private copy of the database and its -wal in
  a temporary directory (its -shm index is never shared, nothing is written in the run directory).

`open_run(run_dir)` returns a RunSource: what status and watch need, from either side.
`open_database(run_dir)` returns a read-only Store for results and report; `watch` draws the
dashboard from a RunSource.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .dashboard import Dashboard, View, build_view
from .publish import EVENTS_FILE, FORMAT, PUBLISHED_DB, STATUS_FILE, gone_after_s, read_events, view_from_json
from .status import status_data
from .store import Event, Store, StoreError
from .units import format_duration

if TYPE_CHECKING:
    from rich.console import Console

DB_FILE = "state.db"
COPY_TRIES = 5  # copies of a killed scheduler's database and -wal taken while a new one starts


@dataclass(frozen=True)
class Writer:
    """The scheduler as its last heartbeat describes it."""

    host: str
    pid: int
    job_id: str | None
    written_at: float
    interval_s: float
    db: str | None
    ended: dict[str, Any] | None

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def limit_s(self) -> float:
        return gone_after_s(self.interval_s)

    def alive(self, now: float) -> bool:
        if self.ended is not None:
            return False
        if self.here:  # on its own host the pid says it exactly, whatever the clocks
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # alive, someone else's
            return True
        return now - self.written_at <= self.limit_s

    def who(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f", job {self.job_id}" if self.job_id else "")

    def line(self, now: float) -> str:
        """One line for `status` and the end of `watch`."""
        if self.ended is not None:
            return f"scheduler ({self.who()}) ended with exit code {self.ended.get('exit_code')}"
        age = format_duration(max(0.0, now - self.written_at))
        if self.alive(now):
            return f"scheduler ({self.who()}) alive, last heartbeat {age} ago"
        if self.here:
            return f"the scheduler ({self.who()}) is gone without recording an end"
        return f"the scheduler ({self.who()}) is gone: no heartbeat for {age} (limit {format_duration(self.limit_s)})"


def read_status_file(run_dir: Path) -> dict[str, Any] | None:
    """status.json, or None when it is missing, unreadable (mid-rename on some NFS clients) or
    not in the format this gpupack reads (another version's scheduler)."""
    try:
        doc = json.loads((Path(run_dir) / STATUS_FILE).read_bytes())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None
        if "view" in doc:
            view_from_json(doc["view"])  # a snapshot that does not parse is no snapshot
            if not isinstance(doc.get("status"), dict) or not isinstance(doc["status"].get("experiments"), list):
                return None
        return doc
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def writer_of(doc: dict[str, Any] | None) -> Writer | None:
    try:
        hb = doc["heartbeat"]  # type: ignore[index]
        return Writer(
            str(hb["host"]), int(hb["pid"]), hb.get("job_id"), float(hb["written_at"]), float(hb["interval_s"]),
            hb.get("db"), doc.get("ended"),  # type: ignore[union-attr]
        )
    except (TypeError, KeyError, ValueError):
        return None


# --- the database, read-only and without side effects -------------------------------------


def open_file(path: Path, writer_here: bool) -> Store:
    """writer_here: a scheduler alive on this host writes it (WAL readers on one host are safe)."""
    if not path.is_file():
        raise StoreError(f"{path}: no such state database")
    if writer_here:
        store = Store(path, readonly=True)
        store.meta()  # SQLite opens lazily: fail here, not in the middle of a command
        return store
    wal = Path(f"{path}-wal")
    problem: Exception | None = None
    for _ in range(COPY_TRIES):
        if _size(wal) == 0:
            return Store(path, readonly=True, immutable=True)  # nothing to apply and nobody writing
        # A killed scheduler's -wal: read a private copy of both, never the shared -shm index (not
        # coherent across NFS clients, and not even creatable in a read-only directory). A new
        # scheduler (a requeued job) may checkpoint and delete the -wal meanwhile: a copy counts
        # only if neither file changed while it was taken, else it is taken again.
        tmp = tempfile.mkdtemp(prefix="gpupack-read-")
        try:
            before = _stamps(path, wal)
            shutil.copyfile(path, Path(tmp) / DB_FILE)
            shutil.copyfile(wal, Path(tmp) / f"{DB_FILE}-wal")
            if _stamps(path, wal) != before:
                raise _Changed(f"{path} changed while it was copied")
            store = Store(Path(tmp) / DB_FILE, readonly=True)
            store.meta()
        except (_Changed, FileNotFoundError) as exc:  # replaced or deleted under the copy
            shutil.rmtree(tmp, ignore_errors=True)
            problem = exc
            continue
        except (OSError, StoreError, sqlite3.Error) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{path}: cannot read it: {exc}") from None
        weakref.finalize(store, shutil.rmtree, tmp, True)
        return store
    raise StoreError(f"{path}: cannot read it: {problem} ({COPY_TRIES} tries; is a scheduler starting?)")


class _Changed(Exception):
    pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _stamps(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    """Each file's (inode, size, mtime): what a writer changes; FileNotFoundError when one is gone."""
    return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))


def open_database(run_dir: Path, now: float | None = None) -> Store:
    """The run's database, read-only, for results and report (see the module's rule)."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    writer = writer_of(read_status_file(run_dir))
    if writer is not None and writer.alive(now):
        live = Path(writer.db) if writer.db else run_dir / DB_FILE
        if writer.here:
            return open_file(live, writer_here=True)
        # With --state-dir the run directory's state.db is itself the published copy.
        copy = run_dir / DB_FILE if live.resolve() != (run_dir / DB_FILE).resolve() else run_dir / PUBLISHED_DB
        if not copy.is_file():
            raise StoreError(
                f"{run_dir}: the scheduler ({writer.who()}) runs on another host and has not published a "
                "copy of its database yet (it does at its first tick); try again in a few seconds"
            )
        return Store(copy, readonly=True, immutable=True)  # replaced by rename, never written in place
    return open_file(run_dir / DB_FILE, writer_here=False)


# --- what status and watch read -------------------------------------------------------------


class RunSource(Protocol):
    """One run as `status` and `watch` see it; the dashboard renders `view` and `events_after`."""

    source: str  # "snapshot" (published files) or "database"
    log_every_s: float

    def view(self, now: float) -> View: ...
    def status(self) -> dict[str, Any]: ...
    def events_after(self, event_id: int) -> list[Event]: ...
    def first_event_id(self) -> int: ...
    def poll(self, now: float) -> str | None: ...  # re-read; why the run is over, None while it goes on
    def writer_line(self, now: float) -> str | None: ...
    def close(self) -> None: ...


class SnapshotSource:
    """The published files of a scheduler alive on another host."""

    source = "snapshot"

    def __init__(self, run_dir: Path, doc: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self._doc = doc
        self._offset = 0
        self._pending: list[Event] = []
        self.log_every_s = float(doc.get("log_every_s") or 60.0)

    def _writer(self) -> Writer | None:
        return writer_of(self._doc)

    def poll(self, now: float) -> str | None:
        doc = read_status_file(self.run_dir)
        if doc is not None and "view" in doc:
            self._doc = doc  # else keep the last good one: a rename in flight, a torn NFS read
        writer = self._writer()
        if writer is None:
            return None
        if writer.ended is not None:
            return f"run ended (exit code {writer.ended.get('exit_code')})"
        return None if writer.alive(now) else writer.line(now)

    def view(self, now: float) -> View:
        view = view_from_json(self._doc["view"])
        # The snapshot was taken up to a second ago (or longer, if the writer is gone): move its
        # clock to now, so elapsed time goes on and the ETA counts down.
        eta = None if view.eta_s is None else max(0.0, view.eta_s - max(0.0, now - view.now))
        return replace(view, now=now, eta_s=eta)

    def status(self) -> dict[str, Any]:
        return dict(self._doc["status"])

    def _read_events(self) -> None:
        events, self._offset = read_events(self.run_dir / EVENTS_FILE, self._offset)
        self._pending.extend(events)

    def events_after(self, event_id: int) -> list[Event]:
        self._read_events()
        events = [e for e in self._pending if e.id > event_id]
        self._pending = []
        return events

    def first_event_id(self) -> int:
        started = self._doc["view"].get("started_at")
        self._read_events()
        return max((e.id for e in self._pending if started is not None and e.t < started), default=0)

    def writer_line(self, now: float) -> str | None:
        writer = self._writer()
        return writer.line(now) if writer else None

    def close(self) -> None:
        pass


class DatabaseSource:
    """The database, on the scheduler's host or with no scheduler alive."""

    source = "database"

    def __init__(self, run_dir: Path, store: Store, frozen: bool = False):
        """frozen: opened with no scheduler alive (immutable, or a private copy): what it shows
        never changes, so a watch on it ends instead of waiting for a scheduler that is not there."""
        self.run_dir = Path(run_dir)
        self.store = store
        self.frozen = frozen
        self._writer = writer_of(read_status_file(self.run_dir))
        try:
            self.log_every_s = float(store.meta().get("log_every") or 60)
        except ValueError:
            self.log_every_s = 60.0

    def view(self, now: float) -> View:
        return build_view(self.store, now)

    def status(self) -> dict[str, Any]:
        return status_data(self.store, self.store.meta().get("run_name", self.run_dir.name))

    def events_after(self, event_id: int) -> list[Event]:
        return self.store.events(after_id=event_id)

    def first_event_id(self) -> int:
        runs = self.store.runs()
        return self.store.last_event_id(before=float(str(runs[-1]["started_at"]))) if runs else 0

    def _current_writer(self, last: dict[str, object]) -> Writer | None:
        """The heartbeat, if it is that of the run the database shows last."""
        w = self._writer
        if w is not None and w.pid == last["pid"] and w.host == last["host"]:
            return w
        return None

    def poll(self, now: float) -> str | None:
        self._writer = writer_of(read_status_file(self.run_dir))
        runs = self.store.runs()
        if not runs:
            return None
        last = runs[-1]
        if last["ended_at"] is not None:
            return f"run ended (exit code {last['exit_code']})"
        if self.frozen and self._writer is not None and self._writer.alive(now):
            return f"a new scheduler started ({self._writer.who()}): run `gpupack watch` again to follow it"
        writer = self._current_writer(last)
        if writer is not None:
            if writer.ended is not None:
                return f"run ended (exit code {writer.ended.get('exit_code')})"
            return None if writer.alive(now) else writer.line(now)
        if self.frozen and last["host"] != socket.gethostname():
            return f"no scheduler is alive: the last one (pid {last['pid']} on {last['host']}) recorded no end and no heartbeat"
        if last["host"] == socket.gethostname():  # a scheduler that published nothing (older gpupack)
            try:
                os.kill(int(str(last["pid"])), 0)
            except ProcessLookupError:
                return f"the scheduler (pid {last['pid']}) is gone without recording an end"
            except PermissionError:
                pass
        return None

    def writer_line(self, now: float) -> str | None:
        runs = self.store.runs()
        writer = self._current_writer(runs[-1]) if runs else None
        if writer is None or runs[-1]["ended_at"] is not None:
            return None
        return writer.line(now)

    def close(self) -> None:
        self.store.close()


def open_run(run_dir: Path, now: float | None = None) -> RunSource:
    """What status and watch read: the published snapshot of a scheduler alive on another host,
    else the database (read-only, without side effects)."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    doc = read_status_file(run_dir)
    writer = writer_of(doc)
    alive = writer is not None and writer.alive(now)
    if doc is not None and writer is not None and "view" in doc and not writer.here and alive:
        return SnapshotSource(run_dir, doc)
    return DatabaseSource(run_dir, open_database(run_dir, now), frozen=not alive)


def watch(run_dir: Path, console: Console, interval_s: float = 2.0) -> int:
    """`gpupack watch`: the run's dashboard from another terminal or host, read-only, until the run
    ends, its scheduler is gone (reader.py: heartbeat), or Ctrl-C."""
    source = open_run(Path(run_dir))
    board = Dashboard(source, Path(run_dir), console, live=console.is_terminal, log_every_s=source.log_every_s)
    why: str | None = None
    try:
        why = source.poll(time.time())
        board.start()
        while why is None:
            time.sleep(interval_s)  # polling files another process writes; there is no event to wait on
            why = source.poll(time.time())
            board.refresh(time.time())
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
        source.close()
    if why:
        console.print(why, markup=False, highlight=False)
    return 0
