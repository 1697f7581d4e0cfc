"""The ranks of a multi-node experiment on simulated nodes, inside its one attempt.

    python -I ranks.py CMD NODE1 NODE2 ...

LocalLauncher runs this (by path, with the scheduler's Python: stdlib only, `-I` so that the
experiment's PYTHONPATH cannot shadow it) in the attempt's wrapper, as its command in place of
`bash -c CMD`. It starts one `bash -c CMD` per node with RANK, NODE_RANK and GPUPACK_NODE_RANK
set (0..K-1, in the order of the nodes), and exits with the first non-zero status of a rank in
the order they end, else 0. When a rank fails the others get SIGTERM, as torchrun stops its
workers: a rank left alone would wait for its lost peer until the collective's timeout (30
minutes for gloo); not after a stop signal, which every rank got and handles in its own time.

gpupack sends the preempt signal to the command alone (launch.py), here this process: it passes
every stop signal on to the ranks still running, as srun passes signals on to a step's tasks, and
waits on. A rank is looked at with waitid(WNOWAIT) before it is reaped, so it is never signalled
after its pid could have been reused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: list[str]) -> int:
    cmd, nodes = argv[0], argv[1:]
    left: dict[int, subprocess.Popen[bytes]] = {}
    preempted = False

    def forward(sig: int, frame: FrameType | None) -> None:
        nonlocal preempted
        preempted = preempted or frame is not None  # a signal, not a failed rank
        for pid in left:  # os.kill, not Popen.send_signal: that one reaps, behind waitid's back
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # cannot happen to an unreaped child; nothing to do if it did
                pass

    # Before the ranks start, so that no signal in between is lost (exec gives them the defaults).
    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    for rank in range(len(nodes)):
        env = dict(os.environ, RANK=str(rank), NODE_RANK=str(rank), GPUPACK_NODE_RANK=str(rank))
        proc = subprocess.Popen(["bash", "-c", cmd], env=env)
        left[proc.pid] = proc
    status = 0
    while left:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # the rank stays a zombie: its pid is its own
        if info is None or info.si_pid not in left:  # nothing but the ranks is started here
            continue
        code = left.pop(info.si_pid).wait()
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
        if code and not status:
            status = code
            if not preempted:  # the others are checkpointing: a TERM now would cut that short
                forward(signal.SIGTERM, None)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
