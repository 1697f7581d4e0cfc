"""Real time: sleep workloads run for real by `gpupack run` (simulated GPUs) and by GNU parallel
with GPU slots, one after the other in one run, against the optimum.

Each workload is N sleeps of whole seconds (1-10, times --scale), each needing 40 GB, so two
share an 80 GB GPU: eight slots on 4 x 80 GB for both tools (GNU parallel: `-j 8`, GPU = slot
% 4, the usual recipe). The same sleeps are listed in random order and shortest first (the order
a user may write them in: the long ones come last).

OPT is exact: the least makespan of N jobs on 8 identical slots, found by a branch-and-bound
search for the smallest feasible makespan from the lower bound max(ceil(total / 8), longest)
up. Each tool is timed as a command (its start-up included), and gpupack also from its first
launch to its last end in state.db (the schedule alone).

    python benchmarks/realtime.py [--scale 1] [--n 40]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from _common import events, machine, run_gpupack

SLOTS = 8


def workload(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(1, 10) for _ in range(n)]


def manifest(path: Path, name: str, durations: list[float]) -> Path:
    rows = "\n".join(
        f"      - {{name: s{i:03d}, cmd: \"sleep {d:g}\", mem: 40GB, time: {d:g}s, util: 0.5}}"
        for i, d in enumerate(durations)
    )
    path.write_text(f"name: {name}\nphases:\n  - name: sleeps\n    experiments:\n{rows}\n")
    return path


def fits(jobs: list[int], slots: int, cap: int) -> bool:
    """Can `jobs` (whole seconds, sorted longest first) run on `slots` within `cap`? Depth-first,
    one job at a time; slots with equal loads are interchangeable, so only one of them is tried."""
    loads = [0] * slots
    suffix = [0] * (len(jobs) + 1)
    for i in range(len(jobs) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + jobs[i]

    def place(i: int) -> bool:
        if i == len(jobs):
            return True
        if suffix[i] > slots * cap - sum(loads):
            return False
        tried = set()
        for s in range(slots):
            if loads[s] in tried or loads[s] + jobs[i] > cap:
                continue
            tried.add(loads[s])
            loads[s] += jobs[i]
            if place(i + 1):
                return True
            loads[s] -= jobs[i]
        return False

    return place(0)


def opt(durations: list[int], slots: int = SLOTS) -> int:
    jobs = sorted(durations, reverse=True)
    cap = max(-(-sum(jobs) // slots), jobs[0])
    while not fits(jobs, slots, cap):
        cap += 1
    return cap


def lpt(durations: list[int], slots: int = SLOTS) -> int:
    """Longest first, each on the least loaded slot: what gpupack's order amounts to here."""
    loads = [0] * slots
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def gnu_parallel(durations: list[float]) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["parallel", "-j", str(SLOTS), "CUDA_VISIBLE_DEVICES=$(( ({%} - 1) % 4 )) sleep {}"],
        input="\n".join(f"{d:g}" for d in durations), text=True, check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sleep by this")
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    base = workload(random.Random(7), args.n)
    best = opt(base) * args.scale
    print(f"machine: {machine()}")
    print(f"{args.n} sleeps, {sum(base) * args.scale:g} s in all, on {SLOTS} slots: OPT {best:g} s, "
          f"longest first (LPT) {lpt(base) * args.scale:g} s")
    print(f"{'order':<15} {'gpupack s':>10} {'/ OPT':>6} {'schedule s':>11} {'/ OPT':>6} {'GNU parallel s':>15} {'/ OPT':>6}")
    with tempfile.TemporaryDirectory() as d:
        for name in ("random", "shortest-first"):
            durations = [x * args.scale for x in (sorted(base) if name == "shortest-first" else base)]
            path = manifest(Path(d) / f"{name}.yaml", name, durations)
            wall, _, _ = run_gpupack(path, "--gpus", "4x80GB")
            marks = [(t, kind) for t, kind, _ in events(Path(d) / "runs" / name) if kind in ("start", "finish")]
            span = max(t for t, _ in marks) - min(t for t, _ in marks)
            par = gnu_parallel(durations)
            print(f"{name:<15} {wall:>10.2f} {wall / best:>6.3f} {span:>11.2f} {span / best:>6.3f} "
                  f"{par:>15.2f} {par / best:>6.3f}")


if __name__ == "__main__":
    main()
