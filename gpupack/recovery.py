"""After a scheduler died: find what its attempts became, so nothing runs twice at once and
nothing that finished runs again.

For every attempt still recorded as launching/running:
- its process group is alive and is really that attempt (the group's leader is the very process
  recorded at launch, pgid with its start time; or, for a run directory of an older gpupack, a
  member of the group carries the attempt's identity): adopt it;
- no process group was recorded (the scheduler died between spawning and recording) but a process
  carrying the attempt's identity (GPUPACK_RUN_DIR + GPUPACK_EXPERIMENT + GPUPACK_ATTEMPT) runs:
  adopt its group;
- else its wrapper left an exit file: it finished while nobody watched, judge it with that status;
- else it died with the scheduler: interrupted, it runs again with GPUPACK_RESUME=1.

An attempt launched by a scheduler on another host (a requeued job that starts on another node)
is never looked for or signalled here: its pid means nothing on this host. Slurm ended its steps
with the job, so unless its wrapper left an exit file it is interrupted and resumes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from . import procs
from .launch import Handle, exit_file_for, read_int_file
from .manifest import Experiment
from .outcome import judge
from .procs import Identity
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


def _find_running(
    attempt: AttemptRow, ident: Identity, leader_start: int | None, local: bool, command_is_child: bool
) -> Handle | None:
    """The attempt's live process group as a Handle, or None; never a group that merely reuses
    its number (see launch.Handle.group_is_ours)."""
    log_path = Path(attempt.log_path)
    exit_file = exit_file_for(log_path)
    pgid = attempt.pgid
    if pgid is None:
        # Died between spawning and recording the pgid: look for the attempt by its identity.
        # Every process of the attempt carries it (wrapper, srun client, command, its children).
        found = procs.find(ident)
        pgid = procs.pgid_of(found[0]) if found else None
        if pgid is None:
            return None
        leader_start = procs.start_time(pgid)  # None: its leader is gone, members keep the number
    elif leader_start is None:
        # No start time recorded (an older gpupack, or the scheduler died within a tick of the
        # launch): the group is the attempt's only if one of its processes carries its identity.
        if not any(procs.pgid_of(pid) == pgid for pid in procs.find(ident)):
            return None
        leader_start = procs.start_time(pgid)
    handle = Handle(
        attempt.experiment, pgid, exit_file, log_path, None, attempt.started_at,
        leader_start=leader_start, identity=ident, local=local, command_is_child=command_is_child,
    )
    return handle if handle.group_is_ours() else None


def recover(
    store: Store,
    experiments: Mapping[str, Experiment],
    now: float,
    run_dir: Path | None = None,
    runs_here: Callable[[str], bool] = lambda node: True,
    command_is_child: bool = True,
) -> list[Recovered]:
    """`run_dir` as experiments see it in GPUPACK_RUN_DIR (default: the store's directory);
    `runs_here(node)`: whether a command placed on `node` runs on this machine;
    `command_is_child`: the launcher's (launch.Handle.command_is_child)."""
    found: list[Recovered] = []
    here = socket.gethostname()
    hosts = {r["id"]: str(r["host"]) for r in store.runs()}  # the scheduler's host of every run
    run_dir_text = str(run_dir if run_dir is not None else store.path.parent)
    open_attempts = store.attempts(states=(A_LAUNCHING, A_RUNNING))
    starts = store.leader_starts([a.id for a in open_attempts])
    for attempt in open_attempts:
        elsewhere = hosts.get(attempt.run_id)
        if elsewhere == here:
            elsewhere = None
        exp = experiments.get(attempt.experiment)
        log_path = Path(attempt.log_path)
        exit_file = exit_file_for(log_path)
        ident = Identity(run_dir_text, attempt.experiment, str(attempt.number))
        handle = None if elsewhere is not None else _find_running(
            attempt, ident, starts.get(attempt.id), runs_here(attempt.node), command_is_child
        )
        if handle is not None:
            found.append(
                Recovered("info", attempt.experiment, f"{attempt.experiment} is still running (pgid {handle.pgid}): adopted", attempt, handle)
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
