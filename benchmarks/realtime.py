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
(longest first, best fit by memory, no reservations). It has no slack at all, the documented
worst case for any list schedule (benchmarks/README.md).

The drawn mix (`--workload mix`): what a real plan looks like, drawn at random rather than cut
to measure: 96 jobs of 10-70 GB (10 GB steps) and 2-15 s, one 2-GPU job of 15-25 s and three
exclusive ones of 4-15 s, listed in random order (about a dozen jobs per GPU lane). Its OPT is
bracketed: below by the area bound, the longest job, dual-feasible-function bounds (a job over
half a GPU never shares it with another; exclusive ones hold a GPU alone) and, with scipy, the
configuration LP of benchmarks/quality.py; above by the best of a few greedy orders and, with
OR-Tools (`pip install -e ".[bench]"`), by a CP-SAT model of the exact problem (each job on one
GPU, or two for the gang, memory summed per GPU within 80 GB), whose proven bound may raise the
lower end. When the two ends meet, OPT is exact. Figures are makespan / the lower end: an upper
bound on makespan / OPT. The same kinds of runs as for the mixed workload, plus eight more draws
in simulation.

    python benchmarks/realtime.py [--scale 1] [--n 40] [--workload uniform|mixed|mix|all]
        [--seed 7] [--solver-s 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import events, machine, run_gpupack  # noqa: E402

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


def need_gb(job: Job, capacity_gb: int = 80) -> int:
    """Memory it takes on each of its GPUs: an exclusive job takes the whole GPU."""
    return capacity_gb if job.exclusive else job.mem_gb


ORDERS: dict[str, Callable[[Job], tuple[int, ...]]] = {  # greedy priorities, highest first
    "longest first": lambda j: (-j.seconds,),
    "largest memory first": lambda j: (-need_gb(j) * j.gpus, -j.seconds),
    "largest area first": lambda j: (-need_gb(j) * j.gpus * j.seconds,),
}


def greedy_makespan(jobs: list[Job], gpus: int = 4, capacity_gb: int = 80, order: str = "longest first") -> float:
    """A list schedule: at every end, each waiting job in `order` starts where it fits, best fit
    by memory (the GPU left with the least free), no reservations."""
    free = [capacity_gb] * gpus
    alone = [False] * gpus  # an exclusive job holds it
    pending = sorted(jobs, key=ORDERS[order])
    running: list[tuple[float, Job, list[int]]] = []
    now = 0.0
    while pending or running:
        for job in list(pending):
            need = need_gb(job, capacity_gb)
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
        now = running[0][0]
        while running and running[0][0] == now:  # every job ending now frees its GPUs first
            _, job, chosen = running.pop(0)
            for g in chosen:
                free[g] += need_gb(job, capacity_gb)
                alone[g] = False
    return now


def gnu_parallel_jobs(jobs: list[Job], slots: int, scale: float) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["parallel", "-j", str(slots), f"CUDA_VISIBLE_DEVICES=$(( ({{%}} - 1) % 4 )) sleep {{}}"],
        input="\n".join(f"{j.seconds * scale:g}" for j in jobs), text=True, check=True,
    )
    return time.perf_counter() - start


def real_runs(tmp: Path, name: str, path: Path, jobs: list[Job], scale: float, best: float) -> None:
    """Run the manifest for real with gpupack, then the same sleeps with GNU parallel -j 4, and
    print both against `best` (OPT, or a lower bound on it)."""
    wall, _, _ = run_gpupack(path, "--gpus", "4x80GB")
    marks = [t for t, kind, _ in events(tmp / "runs" / name) if kind in ("start", "finish")]
    span = max(marks) - min(marks)
    par = gnu_parallel_jobs(jobs, 4, scale)
    print(f"  real: gpupack {wall:.2f} s ({wall / best:.3f} x; first launch to last end {span:.2f} s, "
          f"{span / best:.3f} x), GNU parallel -j 4 {par:.2f} s ({par / best:.3f} x)")


def describe(name: str, jobs: list[Job]) -> str:
    return (f"{name}: {len(jobs)} jobs of {min(j.mem_gb for j in jobs)}-{max(j.mem_gb for j in jobs)} GB and "
            f"{min(j.seconds for j in jobs)}-{max(j.seconds for j in jobs)} s, {sum(j.exclusive for j in jobs)} exclusive, "
            f"{sum(j.gpus == 2 for j in jobs)} on 2 GPUs")


def mixed(tmp: Path, scale: float, horizon: int = 30) -> None:
    jobs = mixed_workload(random.Random(11), horizon)
    best = horizon * scale
    path = mixed_manifest(tmp / "mixed.yaml", "mixed", jobs, scale)
    print(f"{describe('mixed', jobs)}; OPT {best:g} s (area bound {area_bound(jobs) * scale:g} s, met by construction)")
    sim = policy_makespan(path)
    greedy = greedy_makespan(jobs) * scale
    print(f"  simulated: gpupack's policy {sim:.2f} s ({sim / best:.3f} x OPT), plain greedy {greedy:.2f} s "
          f"({greedy / best:.3f} x OPT)")
    for size in (30, 120):  # the same kind of workload, eight draws each: not one lucky draw
        draws(tmp, [mixed_workload(random.Random(seed), size) for seed in range(8)], lambda _: (size, size), f"{size} s")
    real_runs(tmp, "mixed", path, jobs, scale, best)


def draws(tmp: Path, workloads: list[list[Job]], opt: Callable[[list[Job]], tuple[int, int]], what: str) -> None:
    """gpupack's policy and the plain greedy, simulated on each workload, over the lower end of
    `opt` (the lower and upper bounds on its OPT)."""
    ratios, gaps = [], []
    for jobs in workloads:
        low, high = opt(jobs)
        gaps.append(high / low)
        ratios.append((policy_makespan(mixed_manifest(tmp / "draw.yaml", "draw", jobs, 1)) / low, greedy_makespan(jobs) / low))
    pol, gre = [a for a, _ in ratios], [b for _, b in ratios]
    of = "OPT" if max(gaps) == 1 else f"the lower bound (OPT exact in {gaps.count(1)}, else within {max(gaps):.3f} x it)"
    print(f"  simulated, {len(workloads)} draws of {what}: gpupack's policy {min(pol):.3f}-{max(pol):.3f} x {of} "
          f"(mean {sum(pol) / len(pol):.3f}), plain greedy {min(gre):.3f}-{max(gre):.3f} (mean {sum(gre) / len(gre):.3f}); "
          f"gpupack ahead in {sum(a < b for a, b in ratios)}, even in {sum(a == b for a, b in ratios)}")


def mix_workload(rng: random.Random, n: int = 100) -> list[Job]:
    """A plan drawn at random (module docstring): n - 4 jobs of 10-70 GB and 2-15 s, one 2-GPU
    job, three exclusive ones, in random order."""
    jobs = [(rng.randrange(10, 80, 10), rng.randint(2, 15), 1, False) for _ in range(n - 4)]
    jobs.append((rng.randrange(20, 70, 10), rng.randint(15, 25), 2, False))
    jobs += [(rng.randrange(10, 50, 10), rng.randint(4, 15), 1, True) for _ in range(3)]
    rng.shuffle(jobs)
    return [Job(f"m{i:03d}", m, d, g, x) for i, (m, d, g, x) in enumerate(jobs)]


def area_bound(jobs: list[Job], gpus: int = 4, capacity_gb: int = 80) -> float:
    return sum(need_gb(j, capacity_gb) * j.seconds * j.gpus for j in jobs) / (gpus * capacity_gb)


def dff_bound(jobs: list[Job], gpus: int = 4, capacity_gb: int = 80) -> float:
    """The best area bound after a dual-feasible function maps every job's memory: any set of
    jobs that fits one GPU still fits after the mapping, so the mapped area over the GPUs bounds
    the makespan too. Two families: u_e (over capacity - e: the whole GPU, since what shares it
    is under e, which counts 0; e to capacity - e: itself) and Fekete and Schepers' u_k (m itself
    when (k + 1) m / capacity is whole, else floor((k + 1) m / capacity) capacity / k)."""
    def u_e(e: int) -> Callable[[int], float]:
        return lambda m: capacity_gb if m > capacity_gb - e else m if m >= e else 0

    def u_k(k: int) -> Callable[[int], float]:
        return lambda m: m if (k + 1) * m % capacity_gb == 0 else (k + 1) * m // capacity_gb * capacity_gb / k

    maps = [u_e(e) for e in range(1, capacity_gb // 2 + 1)] + [u_k(k) for k in range(1, 9)]
    return max(sum(f(need_gb(j, capacity_gb)) * j.seconds * j.gpus for j in jobs) / (gpus * capacity_gb) for f in maps)


def lp_bound(path: Path) -> float | None:
    """benchmarks/quality.py's configuration LP (None without scipy); every util is 0.01 there,
    so no set of jobs that fits a GPU slows down, as sleeps do not."""
    import quality
    from gpupack.manifest import load

    m = load(path)
    exps = tuple(dataclasses.replace(e, util=0.01) for e in m.experiments)
    return quality.lp_bound(dataclasses.replace(m, experiments=exps), 80 * GB)


def cp_sat(jobs: list[Job], low: int, high: int, seconds: float, gpus: int = 4, capacity_gb: int = 80) -> tuple[int, int, str] | None:
    """OR-Tools' CP-SAT on the exact problem, for a makespan in [low, high) (a schedule of `high`
    is known): (the best makespan, its proven lower bound, the solver's status), or None without
    OR-Tools. INFEASIBLE proves `high` optimal. Whole seconds lose nothing: in a schedule pushed
    left every start is a sum of durations."""
    try:
        from ortools.sat.python import cp_model
    except ImportError:
        return None
    m = cp_model.CpModel()
    makespan = m.new_int_var(low, high - 1, "makespan")
    on: list[list[Any]] = [[] for _ in range(gpus)]  # each GPU: (interval, memory)
    every = []
    for j in jobs:
        start = m.new_int_var(0, high - j.seconds, f"start {j.name}")
        m.add(makespan >= start + j.seconds)
        every.append((m.new_interval_var(start, j.seconds, start + j.seconds, j.name), need_gb(j) * j.gpus))
        if j.gpus == 2:  # the GPUs are alike: the gang on the first two loses no schedule
            here = [m.new_constant(1)] * 2
        else:
            here = [m.new_bool_var(f"{j.name} on {g}") for g in range(gpus)]
            m.add_exactly_one(here)
        for g, x in enumerate(here):
            on[g].append((m.new_optional_interval_var(start, j.seconds, start + j.seconds, x, f"{j.name} {g}"), need_gb(j)))
    for g in range(gpus):
        m.add_cumulative([iv for iv, _ in on[g]], [need for _, need in on[g]], capacity_gb)
        m.add_no_overlap([iv for iv, need in on[g] if 2 * need > capacity_gb])  # implied; it prunes sooner
    m.add_cumulative([iv for iv, _ in every], [need for _, need in every], gpus * capacity_gb)  # implied too
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 2
    status = solver.solve(m)
    if status == cp_model.INFEASIBLE:
        return high, high, "INFEASIBLE below the known schedule"
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return high, max(low, int(solver.best_objective_bound)), solver.status_name(status)
    return int(solver.objective_value), int(solver.best_objective_bound), solver.status_name(status)


def opt_range(tmp: Path, jobs: list[Job], solver_s: float = 0.0) -> tuple[int, int, list[str]]:
    """(lower, upper) bounds on OPT in whole seconds, and how each end was found."""
    path = mixed_manifest(tmp / "bound.yaml", "bound", jobs, 1)
    lows = {"area": area_bound(jobs), "longest job": max(j.seconds for j in jobs), "dual-feasible functions": dff_bound(jobs)}
    lp = lp_bound(path)
    if lp is not None:
        lows["configuration LP"] = lp
    low_by = max(lows, key=lambda k: lows[k])
    low = math.ceil(lows[low_by] - 1e-9)  # every end is a whole second
    highs = {order: int(greedy_makespan(jobs, order=order)) for order in ORDERS}
    high_by = min(highs, key=lambda k: highs[k])
    high = highs[high_by]
    notes = [", ".join(f"{k} {v:.1f}" for k, v in lows.items()) + ("" if lp is not None else " (no scipy: no LP bound)"),
             ", ".join(f"greedy {k} {v}" for k, v in highs.items())]
    if solver_s and low < high:
        found = cp_sat(jobs, low, high, solver_s)
        if found is None:
            notes.append('CP-SAT: OR-Tools is not installed (pip install -e ".[bench]"), analytic bounds only')
        else:
            best, proven, status = found
            notes.append(f"CP-SAT ({solver_s:g} s): {status}, makespan {best}, proven bound {proven}")
            if best < high:
                high, high_by = best, "CP-SAT"
            if proven > low:
                low, low_by = proven, "CP-SAT"
    notes.append(f"OPT {'= ' + str(low) if low == high else f'in [{low}, {high}]'} s (lower: {low_by}; upper: {high_by})")
    return low, high, notes


def mix(tmp: Path, scale: float, solver_s: float, seed: int) -> None:
    jobs = mix_workload(random.Random(seed))
    low, high, notes = opt_range(tmp, jobs, solver_s)
    print(describe("mix", jobs) + "; " + "; ".join(notes[:-1]) + f"\n  {notes[-1]}, times {scale:g}")
    best, path = low * scale, mixed_manifest(tmp / "mix.yaml", "mix", jobs, scale)
    sim = policy_makespan(path)
    line = ", ".join(f"greedy {order} {greedy_makespan(jobs, order=order) * scale:.2f} s "
                     f"({greedy_makespan(jobs, order=order) / low:.3f} x)" for order in ORDERS)
    print(f"  simulated, over the lower bound: gpupack's policy {sim:.2f} s ({sim / best:.3f} x), {line}")
    others = [mix_workload(random.Random(s)) for s in range(8)]  # the one run for real among them (seed 7)
    draws(tmp, others, lambda w: opt_range(tmp, w)[:2], "the same kind")
    real_runs(tmp, "mix", path, jobs, scale, best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every sleep by this")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--workload", choices=("uniform", "mixed", "mix", "all"), default="all")
    parser.add_argument("--solver-s", type=float, default=30.0,
                        help="seconds CP-SAT may search for the mix's optimum (0: analytic bounds only)")
    parser.add_argument("--seed", type=int, default=7, help="which draw of the mix runs for real")
    args = parser.parse_args()
    if shutil.which("parallel") is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    print(f"machine: {machine()}")
    if args.workload in ("mixed", "all"):
        with tempfile.TemporaryDirectory() as d:
            mixed(Path(d), args.scale)
    if args.workload in ("mix", "all"):
        with tempfile.TemporaryDirectory() as d:
            mix(Path(d), args.scale, args.solver_s, args.seed)
    if args.workload in ("mixed", "mix"):
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
