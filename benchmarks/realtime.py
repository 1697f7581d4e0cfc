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

The mixed workload (`--workload mixed`): jobs of 10-70 GB, one 2-GPU job and exclusive ones,
cut out of 4 GPUs x T seconds x 80 GB with nothing left over (every slab of time on a GPU is
split into jobs whose memory sums to 80 GB; an exclusive job holds its GPU alone). OPT is T
exactly: the area bound is T, and the cutting itself is a schedule that meets it. Besides the
two real runs (GNU parallel with one job per GPU, `-j 4`, the recipe that cannot OOM when a 70 GB
job may land beside another), the same jobs are simulated in no time: gpupack's policy through
`gpupack plan`'s simulator (sleeps do not slow each other, so every rate is 1) and a plain greedy
(longest first, best fit by memory, no reservations).

    python benchmarks/realtime.py [--scale 1] [--n 40] [--workload uniform|mixed|all]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


GB = 10**9


@dataclass(frozen=True)
class Job:
    name: str
    mem_gb: int
    seconds: int
    gpus: int = 1
    exclusive: bool = False


def mixed_workload(rng: random.Random, horizon: int = 30) -> list[Job]:
    """Jobs tiling 4 GPUs x horizon seconds x 80 GB (see the module docstring), in random order."""
    jobs: list[tuple[int, int, int, bool]] = [(50, 8, 2, False), (30, 8, 1, False), (30, 8, 1, False)]
    left = {0: horizon - 8, 1: horizon - 8, 2: horizon, 3: horizon}  # the 2-GPU job starts gpu0 and gpu1
    exclusives = 2
    slabs = ("70+10", "60+20", "50+30", "40+40", "30+30+20", "70+10+10", "40+40+40", "exclusive")
    for gpu in left:
        while left[gpu] > 0:
            d = min(left[gpu], rng.randint(3, 8))
            d = left[gpu] if left[gpu] - d < 3 else d  # no slab shorter than 3 s
            kind = rng.choice(slabs if exclusives else slabs[:-1])
            half = d // 2
            if kind == "exclusive":
                exclusives -= 1
                jobs.append((rng.choice((10, 20, 30)), d, 1, True))
            elif kind == "70+10+10":  # one 10 GB job after another beside the 70 GB one
                jobs += [(70, d, 1, False), (10, half, 1, False), (10, d - half, 1, False)]
            elif kind == "40+40+40":
                jobs += [(40, d, 1, False), (40, half, 1, False), (40, d - half, 1, False)]
            else:
                jobs += [(int(m), d, 1, False) for m in kind.split("+")]
            left[gpu] -= d
    rng.shuffle(jobs)
    return [Job(f"j{i:02d}", m, d, g, x) for i, (m, d, g, x) in enumerate(jobs)]


def mixed_manifest(path: Path, name: str, jobs: list[Job], scale: float) -> Path:
    rows = "\n".join(
        f"      - {{name: {j.name}, cmd: \"sleep {j.seconds * scale:g}\", mem: {j.mem_gb}GB, time: {j.seconds * scale:g}s, "
        f"gpus: {j.gpus}, exclusive: {str(j.exclusive).lower()}}}"
        for j in jobs
    )
    path.write_text(f"name: {name}\nphases:\n  - name: mixed\n    experiments:\n{rows}\n")
    return path


def policy_makespan(path: Path) -> float:
    """gpupack's policy in `plan`'s simulator, every rate 1: sleeps do not slow each other."""
    from gpupack import simulate
    from gpupack.gpus import parse_gpu_spec
    from gpupack.manifest import load

    def full_speed(running: Any) -> dict[str, float]:
        return {name: 1.0 for name in running}

    saved = simulate._rates
    simulate._rates = full_speed  # type: ignore[assignment]
    try:
        return simulate.simulate(load(path), parse_gpu_spec("4x80GB", "node")).makespan_s
    finally:
        simulate._rates = saved  # type: ignore[assignment]


def greedy_makespan(jobs: list[Job], gpus: int = 4, capacity_gb: int = 80) -> float:
    """Longest first, best fit by memory (the GPU left with the least free), no reservations."""
    free = [capacity_gb] * gpus
    alone = [False] * gpus  # an exclusive job holds it
    pending = sorted(jobs, key=lambda j: -j.seconds)
    running: list[tuple[float, Job, list[int]]] = []
    now = 0.0
    while pending or running:
        for job in list(pending):
            need = capacity_gb if job.exclusive else job.mem_gb
            fit = [g for g in range(gpus) if not alone[g] and free[g] >= need and (not job.exclusive or free[g] == capacity_gb)]
            if len(fit) < job.gpus:
                continue
            chosen = sorted(fit, key=lambda g: free[g] - need)[: job.gpus]
            for g in chosen:
                free[g] -= need
                alone[g] = job.exclusive
            running.append((now + job.seconds, job, chosen))
            pending.remove(job)
        running.sort(key=lambda r: r[0])
        end, job, chosen = running.pop(0)
        now = end
        for g in chosen:
            free[g] += capacity_gb if job.exclusive else job.mem_gb
            alone[g] = False
    return now


def gnu_parallel_jobs(jobs: list[Job], slots: int, scale: float) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["parallel", "-j", str(slots), f"CUDA_VISIBLE_DEVICES=$(( ({{%}} - 1) % 4 )) sleep {{}}"],
        input="\n".join(f"{j.seconds * scale:g}" for j in jobs), text=True, check=True,
    )
    return time.perf_counter() - start


def mixed(tmp: Path, scale: float, horizon: int = 30) -> None:
    jobs = mixed_workload(random.Random(11), horizon)
    best = horizon * scale
    path = mixed_manifest(tmp / "mixed.yaml", "mixed", jobs, scale)
    area = sum((80 if j.exclusive else j.mem_gb) * j.seconds * j.gpus for j in jobs) / (4 * 80) * scale
    print(f"mixed: {len(jobs)} jobs of {min(j.mem_gb for j in jobs)}-{max(j.mem_gb for j in jobs)} GB, "
          f"{sum(j.exclusive for j in jobs)} exclusive, {sum(j.gpus == 2 for j in jobs)} on 2 GPUs; "
          f"OPT {best:g} s (area bound {area:g} s, met by construction)")
    sim = policy_makespan(path)
    greedy = greedy_makespan(jobs) * scale
    print(f"  simulated: gpupack's policy {sim:.2f} s ({sim / best:.3f} x OPT), plain greedy {greedy:.2f} s "
          f"({greedy / best:.3f} x OPT)")
    for size in (30, 120):  # the same kind of workload, eight draws each: not one lucky draw
        ratios = []
        for seed in range(8):
            draw = mixed_workload(random.Random(seed), size)
            ratios.append((policy_makespan(mixed_manifest(tmp / "draw.yaml", "draw", draw, 1)) / size,
                           greedy_makespan(draw) / size))
        print(f"  simulated, 8 draws of {size} s: gpupack's policy {min(a for a, _ in ratios):.3f}-"
              f"{max(a for a, _ in ratios):.3f} x OPT, plain greedy {min(b for _, b in ratios):.3f}-"
              f"{max(b for _, b in ratios):.3f} x OPT; gpupack ahead in {sum(a < b for a, b in ratios)}, "
              f"even in {sum(a == b for a, b in ratios)}")
    wall, _, _ = run_gpupack(path, "--gpus", "4x80GB")
    marks = [t for t, kind, _ in events(tmp / "runs" / "mixed") if kind in ("start", "finish")]
    span = max(marks) - min(marks)
    par = gnu_parallel_jobs(jobs, 4, scale)
    print(f"  real: gpupack {wall:.2f} s ({wall / best:.3f} x OPT; first launch to last end {span:.2f} s, "
          f"{span / best:.3f} x), GNU parallel -j 4 {par:.2f} s ({par / best:.3f} x OPT)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sleep by this")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--workload", choices=("uniform", "mixed", "all"), default="all")
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    print(f"machine: {machine()}")
    if args.workload in ("mixed", "all"):
        with tempfile.TemporaryDirectory() as d:
            mixed(Path(d), args.scale)
    if args.workload == "mixed":
        return
    base = workload(random.Random(7), args.n)
    best = opt(base) * args.scale
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
