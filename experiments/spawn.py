"""Run a script as N data-parallel ranks on one node, preemption-safe (a torchrun for one node).

    code = spawn.workers(nproc)
    if code is not None:          # the parent: its ranks ran and exited
        raise SystemExit(code)
    ...                           # a rank (or nproc == 1): the training code, with accelerate

The parent re-runs the same command line nproc times with the torch.distributed variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port), which accelerate's
Accelerator reads. Why not torchrun: its agent has no handler for SIGUSR2, the preempt signal
that gpupack sends to the command (the parent here) alone, so it would die at once; and it
answers SIGTERM by terminating its workers on its own schedule. Here the parent outlives the
signal: it forwards the preempt signal to its ranks (which ignore a second copy), waits for them
to checkpoint and exit, and exits with their code. A rank that fails otherwise leaves its peers
blocked in a collective forever, so the parent kills them and exits with the failure's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from gpupack import job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_rank() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def workers(nproc: int) -> int | None:
    """None in a rank (or when nproc <= 1); in the parent, start the ranks and return the exit code."""
    if nproc <= 1 or is_rank():
        return None
    port = str(free_port())
    children: dict[int, subprocess.Popen[bytes]] = {}
    for rank in range(nproc):
        env = os.environ | {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }
        child = subprocess.Popen([sys.executable, *sys.argv], env=env)
        children[child.pid] = child

    def forward() -> None:
        sig = job.preempt_signal()
        for child in children.values():
            if child.poll() is None and sig is not None:
                child.send_signal(sig)

    job.on_preempt(forward)
    code = 0
    while children:
        pid, status = os.wait()  # the next rank to exit, whichever it is
        if pid not in children:
            continue
        del children[pid]
        rc = os.waitstatus_to_exitcode(status)
        rc = 128 - rc if rc < 0 else rc  # killed by signal n -> 128 + n, as a shell reports it
        if rc != 0 and code == 0:
            code = rc
            if job.preempt_signal() is None:  # a real failure: the peers would wait forever
                for child in children.values():
                    child.send_signal(signal.SIGKILL)
    return code
