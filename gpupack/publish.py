"""What the scheduler publishes for readers on other hosts: plain files, safe on NFS, Lustre and GPFS.

SQLite in WAL mode needs every connection on one host (its -shm index is shared memory, not
coherent across NFS clients), so a `watch` on the login node must not open the scheduler's
database. The scheduler (the only writer) publishes instead, in the run directory:

    status.json   replaced atomically (temporary file, fsync, rename) at most once per second on
                  ticks, and at least every heartbeat interval by a thread, so that it also beats
                  while a tick or the grace period is long:
                  {"format": 1,
                   "heartbeat": {"host", "pid", "job_id", "written_at", "interval_s", "db"},
                   "ended": null | {"at", "exit_code"},
                   "status": <status --json>, "view": <the dashboard's view>, "log_every_s"}
    events.log    append-only, one JSON object per line: {"id", "t", "kind", "experiment",
                  "message"}; written by one process, whole lines at a time, so a reader takes the
                  complete lines and leaves a torn last one for later
    snapshot.db   a copy of state.db made with SQLite's online backup, in rollback-
                  journal mode, replaced by rename: what `results` and `report` read on another
                  host while the run goes on. With --state-dir the live database is on node-local
                  disk and this copy is the run directory's state.db itself.

`db` in the heartbeat is where the live database is (the state dir's, with --state-dir), so a
reader on the same host reads it directly. reader.py decides which to read.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .dashboard import GpuView, Occupant, PhaseView, View, build_view
from .files import write_atomic
from .status import status_data
from .store import Event, Store, StoreError

FORMAT = 1
STATUS_FILE = "status.json"
EVENTS_FILE = "events.log"
PUBLISHED_DB = "snapshot.db"
MIN_PUBLISH_INTERVAL_S = 1.0
STATUS_EVERY_S = 30.0  # the status is rebuilt at least this often even when no attempt or state changed
SNAPSHOT_DB_EVERY_S = 60.0  # snapshot.db: `results`/`report` elsewhere may be a minute behind
COPY_DUTY = 10  # the next database copy waits at least ten times as long as the last one took
# A reader calls the writer gone after this many heartbeat intervals without one (and never
# sooner than GONE_MIN_S: clocks of two hosts and NFS attribute caches differ by a few seconds).
GONE_AFTER_INTERVALS = 3
GONE_MIN_S = 10.0


def heartbeat_interval(poll_s: float) -> float:
    """The heartbeat follows the poll interval, between 1 and 10 seconds."""
    return min(10.0, max(1.0, poll_s))


def gone_after_s(interval_s: float) -> float:
    """The documented limit (README "The run directory"): a heartbeat older than this is a dead writer."""
    return max(GONE_MIN_S, GONE_AFTER_INTERVALS * interval_s)


def copy_database(store: Store, dest: Path, scratch_dir: Path) -> None:
    """store -> dest: SQLite's online backup into scratch_dir (a local disk: SQLite never locks a
    file on the network file system), then copied beside dest, fsynced and renamed over it."""
    fd, local = tempfile.mkstemp(dir=scratch_dir, prefix=".gpupack-copy-", suffix=".db")
    os.close(fd)
    try:
        store.backup_to(Path(local))
        write_atomic(dest, Path(local))
    finally:
        Path(local).unlink(missing_ok=True)


# --- the view as JSON (the dashboard renders the same View from either source) --------------


def view_to_json(view: View) -> dict[str, Any]:
    return asdict(view)


def view_from_json(data: dict[str, Any]) -> View:
    return View(
        run=str(data["run"]), now=float(data["now"]), job_id=str(data["job_id"]),
        started_at=data["started_at"], ended_at=data["ended_at"], alloc_end=data["alloc_end"],
        sampled_at=data["sampled_at"], eta_s=data["eta_s"], unestimated=int(data["unestimated"]),
        phases=tuple(PhaseView(p["name"], dict(p["counts"])) for p in data["phases"]),
        gpus=tuple(
            GpuView(g["label"], g["util_pct"], g["used_bytes"], g["total_bytes"], tuple(Occupant(**o) for o in g["occupants"]),
                    str(g.get("unavailable", "")))
            for g in data["gpus"]
        ),
        events=tuple(Event(**e) for e in data["events"]),
    )


def event_to_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "t": event.t, "kind": event.kind, "experiment": event.experiment, "message": event.message}


def read_events(path: Path, offset: int) -> tuple[list[Event], int]:
    """The complete lines of events.log from byte `offset`: (events, the offset after them). A
    torn last line (the writer killed mid-write, or not yet all visible over NFS) waits; a line
    that does not parse is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(Event(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # the fragment a killed writer left before its restart's first line
    return events, offset + end


def _last_logged_id(path: Path) -> int:
    """The id of the last complete line of events.log (0 if none): where appending resumes."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read()
    except FileNotFoundError:
        return 0
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["id"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


class Publisher:
    """The scheduler's side: `start()` once the store is open, `tick(now)` on every engine tick,
    `close(exit_code)` at the end. Writes are best-effort: a full or flaky file system must not
    stop the run, whose truth is the database."""

    def __init__(
        self, run_dir: Path, store: Store, poll_s: float, job_id: str | None, log_every_s: float = 60.0,
        state_dir: Path | None = None,
    ):
        """state_dir: the live database is there, on node-local disk (--state-dir), and the run
        directory's state.db is its copy, renewed every tick (as often as COPY_DUTY allows) and
        at the end; without it, snapshot.db is renewed every SNAPSHOT_DB_EVERY_S for `results`
        and `report` on other hosts, and removed at the end."""
        self.run_dir = Path(run_dir)
        self.store = store
        self.state_dir = state_dir
        self.copy_to = self.run_dir / ("state.db" if state_dir is not None else PUBLISHED_DB)
        self._copy_every_s = 0.0 if state_dir is not None else SNAPSHOT_DB_EVERY_S
        self._next_copy = float("-inf")
        self.copy_error: str | None = None
        self.interval_s = heartbeat_interval(poll_s)
        self.log_every_s = log_every_s
        self.heartbeat: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id or None,
            "written_at": 0.0, "interval_s": self.interval_s, "db": str(Path(store.path).resolve()),
        }
        self._parts: dict[str, str] = {}  # the document's big members, serialized once per build
        self._status_mark: str | None = None
        self._status_built = float("-inf")
        self._last_build = float("-inf")
        self._last_write = float("-inf")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._events_path = self.run_dir / EVENTS_FILE
        self._last_event_id = _last_logged_id(self._events_path)
        newest = store.events(limit=1)
        if self._last_event_id > (newest[-1].id if newest else 0):
            # The log goes further than this database: it is an earlier database's (state.db was
            # deleted and started again). Keep it aside rather than append to it out of order.
            try:
                os.replace(self._events_path, self._events_path.with_name(EVENTS_FILE + ".old"))
            except OSError:
                pass  # best-effort: the log is a reader's convenience
            self._last_event_id = 0
        self._torn = _torn_tail(self._events_path)
        self._ended: dict[str, Any] | None = None

    def start(self, now: float | None = None) -> None:
        # The heartbeat at once; the first database copy at the first tick, after the manifest
        # has been synced and survivors recovered.
        self.tick(time.time() if now is None else now, force=True, copy=False)
        self._thread = threading.Thread(target=self._beat, name="gpupack-heartbeat", daemon=True)
        self._thread.start()

    def tick(self, now: float, force: bool = False, copy: bool = True) -> None:
        """Publish what changed: new events every tick, the status at most once per second."""
        self._append_events()
        if not force and now - self._last_build < MIN_PUBLISH_INTERVAL_S:
            return
        self._last_build = now
        parts = dict(self._parts)
        # The status of 10,000 experiments costs tens of milliseconds to build and serialize:
        # rebuilt only when an attempt or a state changed (or, for reasons, every STATUS_EVERY_S).
        mark = self.store.change_mark()
        if force or mark != self._status_mark or now - self._status_built >= STATUS_EVERY_S:
            status = status_data(self.store, self.store.meta().get("run_name", self.run_dir.name))
            parts["status"] = json.dumps(status, separators=(",", ":"))
            self._status_mark, self._status_built = mark, now
        parts["view"] = json.dumps(view_to_json(build_view(self.store, now)), separators=(",", ":"))
        with self._lock:
            self._parts = parts
            self._write_locked()
        if copy and now >= self._next_copy:
            self._copy(now)

    def _copy(self, now: float) -> bool:
        started = time.monotonic()
        try:
            copy_database(self.store, self.copy_to, self.state_dir or Path(tempfile.gettempdir()))
        except (OSError, sqlite3.Error, StoreError) as exc:
            if self.copy_error is None:  # once per streak of failures, not every second
                self.store.event("warn", None, f"could not copy the database to {self.copy_to}: {exc}", now)
            self.copy_error = str(exc)
            self._next_copy = now + max(self._copy_every_s, MIN_PUBLISH_INTERVAL_S)
            return False
        self.copy_error = None
        self._next_copy = now + max(self._copy_every_s, MIN_PUBLISH_INTERVAL_S, COPY_DUTY * (time.monotonic() - started))
        return True

    def close(self, exit_code: int, now: float | None = None) -> None:
        """The last snapshot says the run ended, so readers stop at once instead of waiting for
        the heartbeat to go stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = time.time() if now is None else now
        self._ended = {"at": now, "exit_code": exit_code}
        if self.state_dir is None:
            self._next_copy = float("inf")
            self.copy_to.unlink(missing_ok=True)  # state.db itself is whole again: no second copy to go stale
        else:
            self._next_copy = float("-inf")  # the last copy back is the one that matters most
        try:
            self.tick(now, force=True)
        except Exception:  # noqa: BLE001  the database may be what failed; say at least that we ended
            with self._lock:
                self._write_locked()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            with self._lock:
                if time.time() - self._last_write >= self.interval_s * 0.9:
                    self._write_locked()

    def _write_locked(self) -> None:
        now = time.time()
        small = {
            "format": FORMAT, "log_every_s": self.log_every_s, "heartbeat": {**self.heartbeat, "written_at": now},
            "ended": self._ended,
        }
        # The heartbeat thread rewrites the document every interval: the big members go in as
        # they were serialized at the last tick.
        text = json.dumps(small, separators=(",", ":"))[:-1] + "".join(f',"{k}":{v}' for k, v in self._parts.items()) + "}"
        try:
            write_atomic(self.run_dir / STATUS_FILE, text.encode())
            self._last_write = now
        except OSError:
            pass  # best-effort: readers then see an older heartbeat, and say so if it grows stale

    def _append_events(self) -> None:
        events = self.store.events(after_id=self._last_event_id)
        if not events:
            return
        text = "".join(json.dumps(event_to_json(e), separators=(",", ":")) + "\n" for e in events)
        try:
            # Opened and closed per tick: NFS close-to-open consistency makes the lines visible to
            # readers on other clients once closed. One write per tick keeps whole lines together.
            with open(self._events_path, "ab") as f:
                if self._torn:
                    text = "\n" + text  # a killed predecessor's torn line stays on a line of its own
                f.write(text.encode())
            self._last_event_id, self._torn = events[-1].id, False
        except OSError:
            pass  # best-effort, retried on the next tick (the events are in the database)


def _torn_tail(path: Path) -> bool:
    """Whether events.log ends in the middle of a line (its writer was killed while writing)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False
