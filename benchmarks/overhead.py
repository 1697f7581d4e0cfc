"""Scheduler overhead, measured with simulated GPUs (no GPU needed):

1. 1,000 trivial experiments (`true`) on 4 x 80 GB: wall time, and the scheduler's own CPU per
   experiment (its process only: the experiments' CPU is theirs).
2. A rerun over 10,000 finished experiments plus one new one: time from the start of
   `gpupack run` to the new experiment's launch.
3. Steady state while 4 GPUs are busy (4 long sleeps): the scheduler's CPU share and RSS.

    python benchmarks/overhead.py [--n 1000] [--rerun 10000] [--steady 30]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, env, events, gpupack_cmd, machine, rss_bytes, run_gpupack


def grid_manifest(path: Path, name: str, n: int, cmd: str = "true", extra: str = "") -> Path:
    path.write_text(
        f"name: {name}\nphases:\n  - name: p\n    experiments:\n"
        f"      - name: \"t{{i}}\"\n        cmd: \"{cmd}\"\n        mem: 1GB\n        time: 1s\n"
        f"        grid: {{i: {list(range(n))}}}\n{extra}"
    )
    return path


def trivial(tmp: Path, n: int) -> None:
    manifest = grid_manifest(tmp / "trivial.yaml", "trivial", n)
    wall, cpu, _ = run_gpupack(manifest, "--gpus", "4x80GB", "--poll", "1")
    print(f"{n} x `true`: wall {wall:.2f} s = {wall / n * 1e3:.2f} ms per experiment; "
          f"scheduler CPU {cpu:.2f} s = {cpu / n * 1e3:.2f} ms per experiment (target <= 2 ms)")


def rerun(tmp: Path, n: int) -> None:
    manifest = grid_manifest(tmp / "big.yaml", "big", n)
    t0 = time.perf_counter()
    run_gpupack(manifest, "--gpus", "16x80GB", "--poll", "1")
    print(f"first run of {n} x `true`: {time.perf_counter() - t0:.1f} s")
    grid_manifest(manifest, "big", n, extra="      - name: new\n        cmd: \"true\"\n        mem: 1GB\n")
    start = time.time()
    wall, _, _ = run_gpupack(manifest, "--gpus", "16x80GB", "--poll", "1")
    launched = next(t for t, kind, exp in events(tmp / "runs" / "big") if kind == "start" and exp == "new")
    print(f"rerun over {n} finished + 1 new: new experiment launched {launched - start:.2f} s after the "
          f"command started (target <= 2 s); whole rerun {wall:.2f} s")


def steady(tmp: Path, seconds: float) -> None:
    manifest = grid_manifest(tmp / "steady.yaml", "steady", 4, cmd=f"sleep {seconds + 10}")
    manifest.write_text(manifest.read_text().replace("mem: 1GB", "mem: 70GB"))
    proc = subprocess.Popen(gpupack_cmd("run", str(manifest), "--gpus", "4x80GB", "--no-report", "--grace", "1"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # start-up (imports, launches) is not steady state
    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    rss = []
    while time.perf_counter() - t0 < seconds:
        rss.append(rss_bytes(proc.pid) or 0)
        time.sleep(1)
    cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
    proc.terminate()
    proc.wait()
    share = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else float("nan")
    print(f"steady state, 4 GPUs busy, {seconds:.0f} s: scheduler CPU {share * 100:.2f}% of a core "
          f"(target < 2%), RSS max {max(rss) / 1e6:.1f} MB (target < 100 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rerun", type=int, default=10000)
    parser.add_argument("--steady", type=float, default=30.0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trivial(tmp, args.n)
        rerun(tmp, args.rerun)
        steady(tmp, args.steady)


if __name__ == "__main__":
    main()
