"""The ranks of a multi-node experiment on simulated nodes, inside its one attempt.

    python -I ranks.py CMD NODE1 NODE2 ...

LocalLauncher runs this (by path, with the scheduler's Python: stdlib only, `-I` so that the
experiment's PYTHONPATH cannot shadow it) in the attempt's wrapper, in place of `bash -c CMD`.
It starts one `bash -c CMD` per node with RANK, NODE_RANK and GPUPACK_NODE_RANK set (0..K-1,
in the order of the nodes), and exits with the first non-zero status of a rank in the order they
end, else 0. When a rank fails the others get SIGTERM, as torchrun stops its workers: a rank left
alone would wait for its lost peer until the collective's timeout (30 minutes for gloo).

The stop signals reach every rank directly (they share the attempt's process group); this
process ignores them, so it outlives the ranks and reports how they ended. Ranks are reaped with
os.wait() in the order they end, so a rank is never signalled after its pid could be reused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _default_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    cmd, nodes = argv[0], argv[1:]
    for sig in STOP_SIGNALS:  # before the ranks start: a signal in between must not kill us
        signal.signal(sig, signal.SIG_IGN)
    left: dict[int, subprocess.Popen[bytes]] = {}
    for rank in range(len(nodes)):
        env = dict(os.environ, RANK=str(rank), NODE_RANK=str(rank), GPUPACK_NODE_RANK=str(rank))
        proc = subprocess.Popen(["bash", "-c", cmd], env=env, preexec_fn=_default_signals)  # noqa: PLW1509 - no threads here
        left[proc.pid] = proc
    status = 0
    while left:
        pid, wait_status = os.wait()
        if left.pop(pid, None) is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says
        if code and not status:
            status = code
            for proc in left.values():  # not reaped yet: their pids are still theirs
                proc.send_signal(signal.SIGTERM)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
