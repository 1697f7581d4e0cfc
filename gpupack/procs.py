"""What /proc says about a process: its start time, its gpupack identity, its children.

A pid alone does not name a process for long: once it exits, the number is handed out again.
gpupack therefore pairs a pid with the process's start time (`/proc/<pid>/stat` field 22, clock
ticks since boot, fixed for the life of the process) and, where it looks for an attempt's
processes, with the identity every experiment carries in its environment: GPUPACK_RUN_DIR +
GPUPACK_EXPERIMENT + GPUPACK_ATTEMPT (README "What an experiment sees"). Linux only, like
everything that launches experiments; a process that cannot be read counts as not ours.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_IDENTITY_KEYS = (b"GPUPACK_RUN_DIR", b"GPUPACK_EXPERIMENT", b"GPUPACK_ATTEMPT")


@dataclass(frozen=True)
class Identity:
    """The attempt a process belongs to, as its environment says."""

    run_dir: str
    experiment: str
    attempt: str

    @classmethod
    def of_env(cls, env: Mapping[str, str]) -> Identity | None:
        try:
            return cls(env["GPUPACK_RUN_DIR"], env["GPUPACK_EXPERIMENT"], env["GPUPACK_ATTEMPT"])
        except KeyError:
            return None


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return data.rsplit(b")", 1)[-1].split()


def _stat_int(pid: int, field: int) -> int | None:
    """Field `field` (numbered as in proc(5)) of /proc/<pid>/stat as an int; None if gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[field - 3]) if fields else None
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    """Field 22, the start time in clock ticks since boot; None if the process is gone."""
    return _stat_int(pid, 22)


def state(pid: int) -> bytes | None:
    """Field 3: R, S, Z ...; None if the process is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def is_same(pid: int, started: int | None) -> bool:
    """The process `pid` is still the one that started at `started` (None: cannot tell, assume so)."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def pgid_of(pid: int) -> int | None:
    return _stat_int(pid, 5)


def identity(pid: int) -> Identity | None:
    """The gpupack identity in a process's environment (as it was at exec); None if absent or
    unreadable (another user's process, or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    found: dict[bytes, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key in _IDENTITY_KEYS:
            found[key] = value.decode(errors="replace")
    if len(found) < len(_IDENTITY_KEYS):
        return None
    return Identity(*(found[k] for k in _IDENTITY_KEYS))


def pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def find(wanted: Identity) -> list[int]:
    """Every process of this machine carrying the attempt's identity, lowest pid first."""
    return sorted(pid for pid in pids() if identity(pid) == wanted)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc/<pid>/task/*/children where the
    kernel has it, else by scanning every process's parent."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    try:
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
        return found
    except FileNotFoundError:
        pass  # a kernel without CONFIG_PROC_CHILDREN
    except OSError:
        return found
    out = []
    for other in pids():
        if _stat_int(other, 4) == pid:  # field 4: the parent
            out.append(other)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def command_targets(pid: int) -> list[int]:
    """The processes that stand for the command `bash -c CMD` started as `pid`.

    A simple CMD (`python train.py`) is exec'd by bash, so `pid` is the program itself. A
    compound one (`cd x && python train.py`, a pipe) keeps bash waiting in front, and bash dies of
    a signal it does not handle without passing it on: the signal is for the program(s) it runs,
    its children. Their own children (DataLoader workers, ranks) are never included."""
    seen = 0
    while seen < 8:  # `bash -c "bash -c ..."`: a few levels at most
        args = cmdline(pid)
        if len(args) < 2 or os.path.basename(args[0]) != "bash" or args[1] != "-c":
            return [pid]
        kids = children(pid)
        if len(kids) != 1:
            return kids or [pid]
        pid, seen = kids[0], seen + 1
    return [pid]
