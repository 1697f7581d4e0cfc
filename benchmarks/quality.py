"""Scheduling quality in simulation: gpupack's policy (the simulator drives the very same
policy.place()) against the two scripts people write today, on three workloads, as makespan /
lower bound.

- seed plan: the mission's 24-hour plan on 4 x H100 80 GB (experiments/h100x4.yaml when given
  with --seed-plan, else the same shape built here: 76 experiments in six phases);
- sweep: 200 configurations with mixed memory (10-70 GB), durations and utilization;
- dag: 8 models, train -> evaluate -> 4 attacks each (depends_on).

Baselines, in the same model (a job alone on its GPU runs at full speed):
- round-robin: the phase-barrier bash script: phases in order, `wait` at each phase end, job i
  of a phase on GPU i mod 4 (a 2-GPU job on the next two), one job per GPU at a time;
- fifo: one experiment per GPU, first in first out, in manifest order, dependencies respected.

    python benchmarks/quality.py [--seed-plan experiments/h100x4.yaml]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpupack.gpus import parse_gpu_spec  # noqa: E402
from gpupack.manifest import Experiment, Manifest, load, load_text  # noqa: E402
from gpupack.simulate import simulate  # noqa: E402

GPUS = 4


def _exp(name: str, mem: float, minutes: float, util: float, gpus: int = 1, extra: str = "") -> str:
    return (f"      - {{name: \"{name}\", cmd: \"true\", mem: {mem}GB, time: {minutes:.1f}m, util: {util},"
            f" gpus: {gpus}{extra}}}")


def seed_plan() -> str:
    lines = ["name: seed-plan", "phases:"]
    lines += ["  - name: seeds", "    experiments:"]
    lines += [_exp(f"bridge-{t}-s{s}", 60, 120, 0.9, extra=", resumable: true")
              for t in ("sst2", "agnews", "trec") for s in (42, 123, 456)]
    lines += ["  - name: probes", "    experiments:"]
    lines += [_exp(f"probe-{m}-l{layer}-{t}", 20, 25, 0.4)
              for m in ("llama-1b", "qwen-1.5b") for layer in (4, 8, 12, 16) for t in ("sst2", "agnews", "trec")]
    lines += ["  - name: baselines", "    experiments:"]
    lines += [_exp(f"lora-{t}-s{s}", 40, 60, 0.7) for t in ("sst2", "agnews", "trec") for s in (42, 123, 456)]
    lines += [_exp(f"zeroshot-{m}-{t}", 16, 15, 0.5) for m in ("llama-1b", "qwen-1.5b") for t in ("sst2", "agnews", "trec")]
    lines += ["  - name: latency", "    experiments:"]
    lines += [_exp(f"latency-c{c}-b{b}", 20, 10, 1.0, extra=", exclusive: true") for c in (2, 4, 8, 16) for b in (1, 8, 32, 128)]
    lines += ["  - name: xsum", "    experiments:"]
    lines += [_exp("xsum-flan-t5", 70, 240, 0.9, gpus=2, extra=", resumable: true"),
              _exp("xsum-lead", 10, 20, 0.3), _exp("xsum-oracle", 10, 30, 0.3)]
    lines += ["  - name: ablations", "    experiments:"]
    lines += [_exp(f"ablation-{size}-s{s}", mem, minutes, 0.8, extra=", resumable: true")
              for size, mem, minutes in (("small", 30, 60), ("medium", 50, 120), ("large", 75, 180)) for s in (42, 123, 456)]
    return "\n".join(lines) + "\n"


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
    lines += [_exp(f"eval-m{m}", 20, 30, 0.5, extra=f", depends_on: [train-m{m}]") for m in range(8)]
    lines += ["  - name: attacks", "    experiments:"]
    lines += [_exp(f"attack{a}-m{m}", 30, 60, 0.7, extra=f", depends_on: [eval-m{m}]") for m in range(8) for a in range(4)]
    return "\n".join(lines) + "\n"


def _t(e: Experiment) -> float:
    return e.time_s or 1800.0


def round_robin(m: Manifest) -> float:
    clock = 0.0
    phases: dict[int, list[Experiment]] = {}
    for e in m.experiments:
        phases.setdefault(e.phase_index, []).append(e)
    for index in sorted(phases):
        free = [clock] * GPUS
        nxt = 0
        for e in phases[index]:
            gpus = [(nxt + k) % GPUS for k in range(max(1, e.gpus))]
            nxt = (nxt + max(1, e.gpus)) % GPUS
            start = max(free[g] for g in gpus)
            for g in gpus:
                free[g] = start + _t(e)
        clock = max(free)
    return clock


def fifo(m: Manifest) -> float:
    free = [0.0] * GPUS
    end: dict[str, float] = {}
    last_start = 0.0
    for e in m.experiments:
        ready = max([last_start] + [end[d] for d in e.depends_on if d in end])
        n = max(1, e.gpus)
        start = max(ready, sorted(free)[n - 1])
        gpus = sorted(range(GPUS), key=lambda g: free[g])[:n]
        for g in gpus:
            free[g] = start + _t(e)
        end[e.name] = start + _t(e)
        last_start = start
    return max(end.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-plan", type=Path, help="a manifest to use as the seed plan (e.g. experiments/h100x4.yaml)")
    args = parser.parse_args()
    inventory = parse_gpu_spec(f"{GPUS}x80GB", "node")
    with tempfile.TemporaryDirectory() as d:
        workloads = {
            "seed plan": load(args.seed_plan) if args.seed_plan else load_text(seed_plan(), Path(d) / "seed.yaml"),
            "sweep (200)": load_text(sweep(random.Random(11)), Path(d) / "sweep.yaml"),
            "dag": load_text(dag(), Path(d) / "dag.yaml"),
        }
        print(f"{'workload':<13} {'n':>4} {'bound h':>8} {'gpupack h':>10} {'x bound':>8} "
              f"{'round-robin h':>14} {'x bound':>8} {'fifo h':>7} {'x bound':>8} {'vs RR':>6}")
        for name, m in workloads.items():
            plan = simulate(m, inventory)
            rr, ff = round_robin(m), fifo(m)
            lb = plan.lower_bound_s
            print(f"{name:<13} {len(m.experiments):>4} {lb / 3600:>8.2f} {plan.makespan_s / 3600:>10.2f} "
                  f"{plan.makespan_s / lb:>8.3f} {rr / 3600:>14.2f} {rr / lb:>8.3f} {ff / 3600:>7.2f} {ff / lb:>8.3f} "
                  f"{rr / plan.makespan_s:>5.2f}x")
            print(f"{'':<13} bounds: " + ", ".join(f"{k} {v / 3600:.2f} h" for k, v in plan.bounds.items())
                  + f"; GPUs busy {plan.busy_fraction:.0%}")


if __name__ == "__main__":
    main()
