"""Real time: sleep workloads run for real by `gpupack run` (simulated GPUs) and by GNU parallel
with GPU slots, in one run, against the optimum.

Each workload is N sleeps of known length; each needs 40 GB, so two share an 80 GB GPU: eight
slots on 4 x 80 GB for both tools (GNU parallel: `-j 8`, GPU = slot % 4, the usual recipe). OPT
is at least max(total / 8, longest) ("OPT >="), and at most what the LPT schedule takes ("LPT");
the ratios are to the lower one, so they overstate the distance to OPT if anything. gpupack's
wall time includes its own start-up (~0.4 s of Python imports).

    python benchmarks/realtime.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import machine, run_gpupack

SLOTS = 8


def workload(name: str, rng: random.Random, n: int, scale: float) -> list[float]:
    durations = [round(rng.uniform(1.0, 8.0) * scale, 2) for _ in range(n)]
    if name == "shortest-first":
        durations.sort()  # the order a user listed them in: the long ones come last
    return durations


def manifest(path: Path, name: str, durations: list[float]) -> Path:
    rows = "\n".join(
        f"      - {{name: s{i:03d}, cmd: \"sleep {d}\", mem: 40GB, time: {d}s, util: 0.5}}" for i, d in enumerate(durations)
    )
    path.write_text(f"name: {name}\nphases:\n  - name: sleeps\n    experiments:\n{rows}\n")
    return path


def lpt(durations: list[float], slots: int = SLOTS) -> float:
    """Longest-processing-time-first list schedule: an upper bound on OPT (with the lower bound
    it brackets OPT)."""
    loads = [0.0] * slots
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def gnu_parallel(durations: list[float]) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["parallel", "-j", str(SLOTS), "CUDA_VISIBLE_DEVICES=$(( ({%} - 1) % 4 )) sleep {}"],
        input="\n".join(str(d) for d in durations), text=True, check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sleep by this")
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    print(f"machine: {machine()}")
    print(f"{'workload':<16} {'OPT >=':>7} {'LPT':>6} {'gpupack s':>10} {'ratio':>6} {'parallel s':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as d:
        for name in ("random", "shortest-first"):
            durations = workload(name, random.Random(7), args.n, args.scale)
            bound = max(sum(durations) / SLOTS, max(durations))
            wall, _, _ = run_gpupack(manifest(Path(d) / f"{name}.yaml", name, durations), "--gpus", "4x80GB", "--poll", "1")
            par = gnu_parallel(durations)
            print(f"{name:<16} {bound:>7.1f} {lpt(durations):>6.1f} {wall:>10.1f} {wall / bound:>6.3f} {par:>11.1f} {par / bound:>6.3f}")


if __name__ == "__main__":
    main()
