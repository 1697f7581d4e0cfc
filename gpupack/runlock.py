"""One scheduler per run directory, on a local disk, NFS or Lustre.

First choice: `flock` on <run>/lock, held for the life of the process and released by the kernel
even on kill -9, so a crash never leaves a stale lock. Linux's NFS client turns flock into POSIX
locks held by the server (NFSv4, or lockd for v3), which two hosts see alike.

Lustre refuses flock unless mounted with `-o flock` (ENOSYS), and some NFS setups have no lock
manager (ENOLCK, EOPNOTSUPP). There the lock is <run>/lock.owner, created with O_EXCL (atomic on
NFSv3+ and Lustre) and holding {"host", "pid", "job_id", "heartbeat"}; a thread renews the
heartbeat every LOCK_BEAT_S by rename. Another scheduler takes it over only when the heartbeat is
older than LOCK_STALE_S and, when the holder is on its own host, its pid is gone; the take-over
compares and removes the stale file under a mutex of its own (lock.owner.takeover, O_EXCL too),
so a scheduler that judged it stale late never removes the fresh lock of a faster one, and of
all that race only one creates the new lock. Two schedulers on two hosts never both run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = "lock"
OWNER_FILE = "lock.owner"
LOCK_BEAT_S = 10.0
LOCK_STALE_S = 60.0  # six missed beats: a scheduler alive on a slow file system is not robbed
_NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)


class LockError(Exception):
    """The run directory is busy or cannot be locked: one line for the user."""


def _busy(run_dir: Path, holder: str) -> LockError:
    return LockError(
        f"{run_dir}: another gpupack run is using this run directory ({holder}); wait for it to end or stop it first"
    )


@contextmanager
def run_lock(run_dir: Path, job_id: str | None = None, now: float | None = None) -> Iterator[None]:
    """Hold the run directory for the block; LockError when another scheduler holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LockError(f"{run_dir}: cannot use the run directory: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise _busy(run_dir, holder) from None
            if exc.errno not in _NO_FLOCK:
                raise LockError(f"{path}: cannot lock it: {exc.strerror}") from None
            with _owner_file(run_dir, job_id, time.time() if now is None else now):
                yield
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the holder's name is a courtesy for the busy message; the lock is held
        yield
    finally:
        os.close(fd)


# --- the fallback: an O_EXCL owner file with a heartbeat ---------------------------------------


def _owner(job_id: str | None, now: float) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "heartbeat": now}


def _describe(owner: dict[str, Any]) -> str:
    if owner.get("unreadable"):
        return "lock.owner, being written"
    job = f", job {owner.get('job_id')}" if owner.get("job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, flock unavailable: lock.owner"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _stale(owner: dict[str, Any], now: float) -> bool:
    try:
        beat = float(owner["heartbeat"])
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if now - beat <= LOCK_STALE_S:
        return False
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(pid, 0)
            return False  # its heartbeat stopped but the process lives (stopped, swapped out)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return True


def _mtime(path: Path, now: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return now


def _create(path: Path, owner: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner))
        f.flush()
        os.fsync(f.fileno())
    return True


def _take_over(path: Path, judged: dict[str, Any], now: float) -> None:
    """Remove the owner file judged stale, under the take-over mutex (lock.owner.takeover, O_EXCL):
    only one scheduler at a time compares and removes, and only the very file judged stale, so a
    fresh lock written by a faster taker is never removed. The caller then races on O_EXCL."""
    mutex = path.with_name(f"{path.name}.takeover")
    if not _create(mutex, _owner(None, now)):
        if now - _mtime(mutex, now) > LOCK_STALE_S:  # a taker that died half-way: clear it
            mutex.unlink(missing_ok=True)
        return  # another scheduler is taking over: it wins or leaves the lock as it was
    try:
        current = _read(path)
        if current == judged or (judged.get("unreadable") and current is None):
            path.unlink(missing_ok=True)
    finally:
        mutex.unlink(missing_ok=True)


@contextmanager
def _owner_file(run_dir: Path, job_id: str | None, now: float) -> Iterator[None]:
    path = run_dir / OWNER_FILE
    owner = _owner(job_id, now)
    try:
        if not _create(path, owner):
            current = _read(path)
            if current is None:  # a holder killed between creating and writing it leaves it empty
                current = {"heartbeat": _mtime(path, now), "pid": 0, "host": "", "unreadable": True}
            if not _stale(current, now):
                raise _busy(run_dir, _describe(current))
            _take_over(path, current, now)
            if not _create(path, owner):
                raise _busy(run_dir, _describe(_read(path) or {}))
    except OSError as exc:
        raise LockError(f"{path}: cannot create the lock file: {exc.strerror}") from None
    stop = threading.Event()
    beat = threading.Thread(target=_renew, args=(path, owner, stop), name="gpupack-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        current = _read(path) or {}
        if (current.get("host"), current.get("pid")) == (owner["host"], owner["pid"]):
            path.unlink(missing_ok=True)


def _renew(path: Path, owner: dict[str, Any], stop: threading.Event) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    while not stop.wait(LOCK_BEAT_S):
        current = _read(path)
        if current is None or current.get("pid") != owner["pid"] or current.get("host") != owner["host"]:
            return  # no longer ours (taken over after a long stall): never overwrite another's lock
        owner["heartbeat"] = time.time()
        try:
            tmp.write_text(json.dumps(owner))
            os.replace(tmp, path)
        except OSError:
            pass  # best-effort: a missed beat or two is far from stale
