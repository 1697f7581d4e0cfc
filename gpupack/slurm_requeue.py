"""The end of the allocation (slurm/README.md "End of the allocation"): `requeue()` the job, or
where requeue is disabled `resubmit()` its batch script (`job_script()`); `engine_hooks()` gives
the engine these and the time left. The caller bounds requeues with `Allocation.restart_count`
(--max-requeues)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .hooks import Hooks
from .slurm import Allocation, AllocationClock, Runner, SlurmError, ask, end_time, run_command, show_job


def requeue(job_id: str, *, run: Runner = run_command) -> bool:
    """`scontrol requeue J`. False where the job may not be requeued (--no-requeue,
    JobRequeue=0): "Requested operation is presently disabled".

    Slurm then sends SIGTERM to the batch process, i.e. the caller, and SIGKILL KillWait seconds
    later: call it last, with SIGTERM already treated as "stopping"."""
    try:
        run(["scontrol", "requeue", job_id])
    except SlurmError:  # disabled (SlurmFailed) or no answer: either way the job is not requeued
        return False
    return True


def cancelled(job_id: str, *, run: Runner = run_command) -> bool:
    """The job is being cancelled by `scancel` (the user or an admin), which gpupack must not undo
    by requeueing it. While its processes get SIGTERM Slurm shows such a job COMPLETING (then
    CANCELLED) with no reason, and the batch step's stderr ends with slurmstepd's "*** JOB J ON
    NODE CANCELLED AT TIME ***"; a time limit or a preemption appends "DUE TO ..." to that line
    (and a time limit also sets Reason=TimeLimit), and the allocation's warning signal leaves the
    job RUNNING. Whatever cannot be read counts as not cancelled: requeueing is the safe side."""
    info = show_job(job_id, run=run) or {}
    if info.get("JobState") not in ("COMPLETING", "CANCELLED") or info.get("Reason", "None") != "None":
        return False
    stderr = info.get("StdErr", "").strip()
    try:
        with open(stderr, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    lines = [line for line in tail.splitlines() if f"*** JOB {job_id} ON " in line and " CANCELLED AT " in line]
    return bool(lines) and " DUE TO " not in lines[-1]


def resubmit(
    script: str, args: Sequence[str], *, job_id: str | None = None, run: Runner = run_command
) -> str | None:
    """`sbatch SCRIPT ARGS...` for where requeue is disabled; returns the new job id or None.

    SCRIPT is the original batch script: `job_script()` reads it from `scontrol show job`
    (Command=, the path given to sbatch; sbatch runs a spooled copy). ARGS are the arguments the
    script received: for parallel.slurm, gpupack's own `run` arguments. With `job_id`, the time
    limit, partition, account, QOS and working directory of that job are carried over, since
    options given on the original sbatch command line would otherwise be lost."""
    opts: list[str] = []
    info = show_job(job_id, run=run) if job_id else None
    if info:
        for key, opt in (("TimeLimit", "--time"), ("Partition", "--partition"),
                         ("Account", "--account"), ("QOS", "--qos"), ("WorkDir", "--chdir")):
            value = info.get(key, "")
            if value not in ("", "(null)", "N/A", "UNLIMITED"):
                opts.append(f"{opt}={value}")
    out = ask(run, ["sbatch", "--parsable", *opts, script, *args])
    if not out or not out.strip():
        return None
    return out.strip().split(";")[0]  # --parsable: "jobid[;cluster]"


def job_script(job_id: str, args: Sequence[str] = (), *, run: Runner = run_command) -> str | None:
    """Path of the batch script the job was submitted with; None for `sbatch --wrap` or stdin.

    `scontrol show job` joins the path and the script's arguments with spaces (Command=); the
    known `args` are cut off the end, so a path with spaces survives when they are given."""
    command = (show_job(job_id, run=run) or {}).get("Command", "").strip()
    if not command or command == "(null)":
        return None
    tail = " ".join(args)
    if tail and command.endswith(" " + tail):
        return command[: -len(tail) - 1].strip()
    return command.split()[0]


def engine_hooks(
    allocation: Allocation, max_requeues: int, *, run_args: Sequence[str] | None = None,
    run: Runner = run_command,
) -> Hooks:
    """The engine's view of Slurm: time left (refreshed now and then) and the end-of-allocation
    action: requeue while `allocation.restart_count < max_requeues`, else nothing; where requeue
    is disabled, resubmit the batch script with `run_args` (default: this process's arguments
    after `run`, i.e. what parallel.slurm passed to `gpupack run`)."""
    job = allocation.job_id
    clock = AllocationClock(job, query=lambda j, now: end_time(j, now, run=run))
    if run_args is None:
        argv = sys.argv
        run_args = argv[argv.index("run") + 1 :] if "run" in argv else []
    args = list(run_args)

    def end_of_allocation() -> str | None:
        done = allocation.restart_count
        if done >= max_requeues:
            return f"not requeued: job {job} has been requeued {done} times (--max-requeues {max_requeues})"
        if cancelled(job, run=run):
            return f"not requeued: job {job} was cancelled (scancel); submit it again to resume"
        if requeue(job, run=run):
            return f"requeued job {job} (run {done + 2})"
        script = job_script(job, args, run=run)
        new = resubmit(script, args, job_id=job, run=run) if script else None
        if new:
            return f"requeue disabled for job {job}; resubmitted {script} as job {new}"
        return f"job {job} could neither be requeued nor resubmitted; submit it again to resume"

    return Hooks(
        time_left=clock.time_left_s,
        requeue=end_of_allocation,
        cpus_per_node=dict(zip(allocation.nodes, allocation.cpus_per_node)) or None,
        job_id=job,
        retry_failed=allocation.restart_count == 0,
    )
