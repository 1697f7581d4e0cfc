"""Multi-node pools in simulation (README "Commands", `--gpus NODESxGPUSxSIZE`):

1. `gpupack plan --gpus 8x4x80GB` of a 2,000-experiment manifest, timed as a user waits for it
   (a subprocess: start-up, reading the manifest, the simulation, the rendering);
2. placement overhead per experiment: the time spent in policy.place() while the simulator plans
   the same 2,000 one-node experiments on 4 GPUs (1 node) and on 32 (8 nodes of 4), over the
   number of experiments. More GPUs mean more GPUs to look at per placement; the target is that
   32 cost at most 1.5 x what 4 do per experiment.

The manifest: 2,000 experiments of 1 GPU (10-70 GB, 5-60 min, util 0.3-1) and 2 GPUs (5%), plus,
for the plan of (1), 20 `nodes: 2` experiments of 2 h that take two whole nodes each.

    python benchmarks/nodes.py [--n 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import env, gpupack_cmd, machine  # noqa: E402
from gpupack import policy, simulate  # noqa: E402
from gpupack.gpus import node_gpus, parse_gpu_spec  # noqa: E402
from gpupack.manifest import load_text  # noqa: E402


def manifest_text(n: int, whole_nodes: int, rng: random.Random) -> str:
    lines = ["name: nodes", "phases:", "  - name: p", "    experiments:"]
    for i in range(n):
        gpus = 2 if rng.random() < 0.05 else 1
        mem, minutes = rng.choice([10, 20, 40, 70]), rng.uniform(5, 60)
        util = rng.choice([0.3, 0.5, 0.8, 1.0])
        lines.append(f'      - {{name: "e{i:05d}", cmd: "true", gpus: {gpus}, mem: {mem}GB, time: {minutes:.1f}m, util: {util}}}')
    for i in range(whole_nodes):
        lines.append(f'      - {{name: "ddp{i:03d}", cmd: "true", nodes: 2, mem: 60GB, time: 2h}}')
    return "\n".join(lines) + "\n"


def plan_s(path: Path, spec: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `gpupack plan`: on a shared machine the CPU time is
    what the plan costs, the wall time what the user waited."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(gpupack_cmd("plan", str(path), "--gpus", spec), env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"gpupack plan failed ({done.returncode}): {done.stderr}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def place_s_per_experiment(text: str, path: Path, spec: str) -> tuple[float, int]:
    """(seconds in policy.place() per experiment, place() calls) of one simulated plan."""
    inventory = parse_gpu_spec(spec, "node")
    m = load_text(text, path, node_gpus=node_gpus(inventory))
    spent, calls = 0.0, 0
    real = policy.place

    def timed(*args: Any, **kwargs: Any) -> Any:
        nonlocal spent, calls
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent += time.perf_counter() - t
            calls += 1

    policy.place = timed  # simulate() calls policy.place through the module
    try:
        simulate.simulate(m, inventory)
    finally:
        policy.place = real
    return spent / len(m.experiments), calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "nodes.yaml"
        path.write_text(manifest_text(args.n, 20, random.Random(12)))
        runs = [plan_s(path, "8x4x80GB") for _ in range(args.repeat)]
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"plan --gpus 8x4x80GB, {args.n} + 20 nodes:2 experiments: wall median {statistics.median(walls):.2f} s "
              f"(min {min(walls):.2f}, max {max(walls):.2f}), CPU median {statistics.median(cpus):.2f} s "
              f"(min {min(cpus):.2f}); target <= 5 s")
        one_node = manifest_text(args.n, 0, random.Random(12))
        per: dict[str, list[float]] = {"4x80GB": [], "8x4x80GB": []}
        for _ in range(args.repeat):
            for spec in per:  # interleaved, so a slow spell of the machine hits both
                cost, calls = place_s_per_experiment(one_node, path, spec)
                per[spec].append(cost)
        med = {spec: statistics.median(v) for spec, v in per.items()}
        for spec, v in per.items():
            print(f"place() per experiment on {spec:>8} ({len(parse_gpu_spec(spec, 'n')):>2} GPUs): "
                  f"median {med[spec] * 1e3:.3f} ms (min {min(v) * 1e3:.3f}, max {max(v) * 1e3:.3f})")
        ratio = med["8x4x80GB"] / med["4x80GB"]
        print(f"32 GPUs / 4 GPUs: {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
