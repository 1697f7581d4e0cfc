"""After a scheduler died: find what its attempts became, so nothing runs twice at once and
nothing that finished runs again.

For every attempt still recorded as launching/running:
- its process group is alive and is really that attempt (the group leader's command line names
  the attempt's exit file, or a member's environment names the experiment): adopt it;
- else its wrapper left an exit file: it finished while nobody watched, judge it with that status;
- else it died with the scheduler: interrupted, it runs again with GPUPACK_RESUME=1.

An attempt launched by a scheduler on another host (a requeued job that starts on another node)
is never looked for or signalled here: its pid means nothing on this host. Slurm ended its steps
with the job, so unless its wrapper left an exit file it is interrupted and resumes.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .launch import Handle, exit_file_for, group_alive, pid_file_for, read_int_file
from .manifest import Experiment
from .outcome import judge
from .store import (
    A_FAILED,
    A_INTERRUPTED,
    A_LAUNCHING,
    A_RUNNING,
    A_SUCCEEDED,
    FAILED,
    INTERRUPTED,
    SUCCEEDED,
    AttemptRow,
    Store,
)


@dataclass(frozen=True)
class Recovered:
    kind: str  # event kind
    name: str
    message: str
    attempt: AttemptRow
    handle: Handle | None = None  # set when the attempt is still running and was adopted


def _group_is_attempt(pgid: int, exit_file: Path, name: str) -> bool:
    """Guard against pid reuse: only adopt a group that is provably this attempt's."""
    try:
        with open(f"/proc/{pgid}/cmdline", "rb") as f:
            if str(exit_file).encode() in f.read():
                return True
    except OSError:
        pass
    # Leader gone (it was our wrapper): look for members of the group running this experiment.
    wanted = f"GPUPACK_EXPERIMENT={name}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted in f.read().split(b"\0"):
                    return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def recover(store: Store, experiments: Mapping[str, Experiment], now: float) -> list[Recovered]:
    found: list[Recovered] = []
    here = socket.gethostname()
    hosts = {r["id"]: str(r["host"]) for r in store.runs()}  # the scheduler's host of every run
    for attempt in store.attempts(states=(A_LAUNCHING, A_RUNNING)):
        elsewhere = hosts.get(attempt.run_id)
        if elsewhere == here:
            elsewhere = None
        exp = experiments.get(attempt.experiment)
        log_path = Path(attempt.log_path)
        exit_file = exit_file_for(log_path)
        pgid = attempt.pgid
        if pgid is None:
            # Died between spawning and recording the pgid: the wrapper wrote its pid (= pgid,
            # it leads its own session) as its first act.
            pgid = read_int_file(pid_file_for(log_path)) or -1
        if elsewhere is None and pgid > 0 and group_alive(pgid) and _group_is_attempt(pgid, exit_file, attempt.experiment):
            handle = Handle(attempt.experiment, pgid, exit_file, log_path, None, attempt.started_at)
            found.append(
                Recovered("info", attempt.experiment, f"{attempt.experiment} is still running (pgid {pgid}): adopted", attempt, handle)
            )
            continue
        code = read_int_file(exit_file)
        if code is not None and exp is not None:
            outcome = judge(code, exp.outputs, exp.workdir, log_path)
            if outcome.succeeded:
                store.end_attempt(attempt.id, A_SUCCEEDED, code, now, SUCCEEDED)
                found.append(Recovered("finish", attempt.experiment, f"{attempt.experiment} succeeded while the scheduler was down", attempt))
            else:
                store.end_attempt(attempt.id, A_FAILED, code, now, FAILED, outcome.reason, oom=outcome.oom)
                found.append(
                    Recovered("fail", attempt.experiment, f"{attempt.experiment} failed ({outcome.reason}) while the scheduler was down", attempt)
                )
            continue
        if elsewhere is not None:
            why, lost = f"its scheduler ran on {elsewhere}", f"was lost with the previous scheduler on {elsewhere}"
        else:
            why, lost = "the scheduler stopped while it ran", "was lost with the previous scheduler"
        store.end_attempt(attempt.id, A_INTERRUPTED, code, now, INTERRUPTED, why)
        found.append(Recovered("interrupt", attempt.experiment, f"{attempt.experiment} {lost}: it runs again", attempt))
    return found
