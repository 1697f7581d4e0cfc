"""Scheduling quality in simulation: gpupack's policy (the simulator drives the very same
policy.place()) against the two scripts people write today, as makespan / lower bound.

Workloads, on 4 x 80 GB:
- seed plan: experiments/h100x4.yaml (76 experiments in six phases), and the same plan with its
  phases merged into one, which shows what the manifest's phase order costs;
- sweep: 200 configurations with mixed memory (10-70 GB), durations and util;
- dag: 8 models, train -> evaluate -> 4 attacks each (depends_on), one phase per stage.

Baselines, in the same model (one job per GPU runs at full speed; CPU-only jobs take no GPU):
- round-robin: the phase-barrier bash script: phases in order, `wait` at each phase end, job i
  of a phase on GPU i mod 4 (a 2-GPU job on the next two), one job per GPU at a time;
- fifo: one experiment per GPU, started in manifest order as GPUs free up, dependencies respected.

Besides gpupack's own lower bound (`gpupack plan`), the configuration LP bound when scipy is
installed: the least GPU-time in which GPUs, each holding at every instant a set of experiments
whose memory fits, deliver every experiment's work at the model's rates (1 / max(1, sum of util)),
over the GPUs. It drops ordering, dependencies and gangs' lockstep, so it is a lower bound too,
and a tighter one where memory keeps low-util experiments from filling a GPU's compute.

    python benchmarks/quality.py [--seed-plan experiments/h100x4.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpupack.gpus import parse_gpu_spec  # noqa: E402
from gpupack.manifest import Manifest, load, load_text  # noqa: E402
from gpupack.simulate import duration_s, simulate  # noqa: E402

GPUS = 4
ROOT = Path(__file__).resolve().parent.parent


def _exp(name: str, mem: float, minutes: float, util: float, extra: str = "") -> str:
    return f'      - {{name: "{name}", cmd: "true", mem: {mem}GB, time: {minutes:.1f}m, util: {util}{extra}}}'


def sweep(rng: random.Random) -> str:
    lines = ["name: sweep", "phases:", "  - name: sweep", "    experiments:"]
    for i in range(200):
        mem = rng.choice([10, 20, 40, 70])
        lines.append(_exp(f"cfg{i:03d}", mem, rng.lognormvariate(3.4, 0.6), rng.choice([0.3, 0.5, 0.8, 1.0])))
    return "\n".join(lines) + "\n"


def dag() -> str:
    lines = ["name: dag", "phases:"]
    lines += ["  - name: train", "    experiments:"] + [_exp(f"train-m{m}", 60, 180, 0.9) for m in range(8)]
    lines += ["  - name: evaluate", "    experiments:"]
    lines += [_exp(f"eval-m{m}", 20, 30, 0.5, f", depends_on: [train-m{m}]") for m in range(8)]
    lines += ["  - name: attacks", "    experiments:"]
    lines += [_exp(f"attack{a}-m{m}", 30, 60, 0.7, f", depends_on: [eval-m{m}]") for m in range(8) for a in range(4)]
    return "\n".join(lines) + "\n"


def merged(m: Manifest) -> Manifest:
    """The same experiments in one phase: the policy ranks them by critical path and length only."""
    exps = tuple(dataclasses.replace(e, phase_index=0, barrier=False) for e in m.experiments)
    return dataclasses.replace(m, experiments=exps)


def lp_bound(m: Manifest, capacity_bytes: int) -> float | None:
    """The configuration LP bound of the module docstring, in seconds; None without scipy."""
    try:
        from scipy.optimize import linprog
    except ImportError:
        return None
    work: dict[tuple[int, float], float] = {}  # (mem, util) -> GPU-seconds of work
    alone = 0.0  # exclusive or memory-unknown: a GPU each, nothing shares it
    for e in m.experiments:
        if e.gpus and (e.exclusive or e.mem_bytes is None):
            alone += e.gpus * duration_s(e)
        elif e.gpus and e.mem_bytes is not None:
            work[(e.mem_bytes, e.util)] = work.get((e.mem_bytes, e.util), 0.0) + e.gpus * duration_s(e)
    types = list(work)
    configs: list[tuple[int, ...]] = []

    def fill(i: int, mem: int, counts: tuple[int, ...]) -> None:
        if i == len(types):
            configs.append(counts)
            return
        k = 0
        while mem + k * types[i][0] <= capacity_bytes:
            fill(i + 1, mem + k * types[i][0], counts + (k,))
            k += 1

    fill(0, 0, ())
    configs = [c for c in configs if any(c)]
    if not configs:
        return alone / GPUS
    rate = [1.0 / max(1.0, sum(k * t[1] for k, t in zip(c, types))) for c in configs]
    a_ub = [[-c[i] * r for c, r in zip(configs, rate)] for i in range(len(types))]
    res = linprog([1.0] * len(configs), A_ub=a_ub, b_ub=[-work[t] for t in types], bounds=(0, None), method="highs")
    return (res.fun + alone) / GPUS if res.status == 0 else None


def round_robin(m: Manifest) -> float:
    clock = 0.0
    end: dict[str, float] = {}
    for index in sorted({e.phase_index for e in m.experiments}):
        free = [clock] * GPUS
        nxt = 0
        for e in (e for e in m.experiments if e.phase_index == index):
            ready = max([clock] + [end.get(d, 0.0) for d in e.depends_on])
            gpus = [(nxt + k) % GPUS for k in range(e.gpus)]
            nxt = (nxt + e.gpus) % GPUS
            start = max([ready] + [free[g] for g in gpus])
            end[e.name] = start + duration_s(e)
            for g in gpus:
                free[g] = end[e.name]
        clock = max(end.values())  # `wait`
    return clock


def fifo(m: Manifest) -> float:
    free = [0.0] * GPUS
    end: dict[str, float] = {}
    last_start = 0.0
    for e in m.experiments:
        ready = max([last_start] + [end[d] for d in e.depends_on if d in end])
        gpus = sorted(range(GPUS), key=lambda g: free[g])[: e.gpus]
        start = max([ready] + [free[g] for g in gpus])
        end[e.name] = start + duration_s(e)
        for g in gpus:
            free[g] = end[e.name]
        last_start = start
    return max(end.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-plan", type=Path, default=ROOT / "experiments" / "h100x4.yaml")
    args = parser.parse_args()
    inventory = parse_gpu_spec(f"{GPUS}x80GB", "node")
    with tempfile.TemporaryDirectory() as d:
        seed = load(args.seed_plan)
        sweep_m = load_text(sweep(random.Random(11)), Path(d) / "sweep.yaml")
        dag_m = load_text(dag(), Path(d) / "dag.yaml")
    workloads = {  # name: (what gpupack runs, what the scripts run)
        "seed plan": (seed, seed),
        "seed, 1 phase": (merged(seed), seed),
        "sweep (200)": (sweep_m, sweep_m),
        "dag": (dag_m, dag_m),
    }
    print(f"{'workload':<14} {'n':>4} {'bound h':>8} {'LP h':>6} {'gpupack h':>10} {'x bound':>8} {'x LP':>6} "
          f"{'round-robin h':>14} {'x bound':>8} {'fifo h':>7} {'x bound':>8} {'vs RR':>6}")
    figures = {}
    for name, (m, script) in workloads.items():
        plan = simulate(m, inventory)
        lb, ms = plan.bound.lower_bound_s, plan.makespan_s
        lp_s = lp_bound(m, inventory[0].total_bytes)
        lp = max(lb, lp_s) if lp_s is not None else float("nan")  # nan: scipy is not installed
        rr, ff = round_robin(script), fifo(script)
        figures[name] = (lb, ms, rr)
        print(f"{name:<14} {len(m.experiments):>4} {lb / 3600:>8.2f} {lp / 3600:>6.2f} {ms / 3600:>10.2f} "
              f"{ms / lb:>8.3f} {ms / lp:>6.3f} {rr / 3600:>14.2f} {rr / lb:>8.3f} {ff / 3600:>7.2f} {ff / lb:>8.3f} "
              f"{rr / ms:>5.2f}x")
        b = plan.bound
        print(f"{'':<14} bound parts: util area {b.util_area_s / 3600:.2f} h, memory area "
              f"{b.memory_area_s / 3600:.2f} h, critical path {b.critical_path_s / 3600:.2f} h; "
              f"GPUs busy {plan.busy_fraction:.0%}")
    lb, ms, rr = figures["seed plan"]
    print(f"\ntargets on the seed plan ({args.seed_plan.name}):")
    print(f"  makespan <= 1.05 x bound: {ms / lb:.3f} -> {'met' if ms <= 1.05 * lb else 'NOT met'}")
    print(f"  >= 2x faster than round-robin: {rr / ms:.2f}x -> {'met' if rr >= 2 * ms else 'NOT met'}"
          f" (no schedule can do better than round-robin / bound = {rr / lb:.2f}x)")


if __name__ == "__main__":
    main()
