"""Scheduler overhead, measured with simulated GPUs (no GPU needed):

1. 1,000 trivial experiments (`true`) on 4 x 80 GB: overhead per experiment = (wall time - the
   floor) / n, where the floor is what starting the same 1,000 `bash -c true` costs this machine
   without a scheduler (a bare loop, four at a time, each with its own directory and log file, as
   the run directory's contract asks); and the scheduler's own CPU per experiment (its process
   only: the experiments' CPU is theirs).
2. A rerun over 10,000 finished experiments plus one new one: time from the start of
   `gpupack run` to the moment the new experiment runs (it writes the time itself).
3. Steady state while 4 GPUs are busy (4 long sleeps): the scheduler's CPU share and RSS.

    python benchmarks/overhead.py [--n 1000] [--rerun 10000] [--steady 30] [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from _common import CLOCK_TICKS, cpu_seconds, env, events, gpupack_cmd, machine, rss_bytes, run_gpupack


def grid_manifest(path: Path, name: str, n: int, cmd: str = "true", extra: str = "") -> Path:
    path.write_text(
        f"name: {name}\nphases:\n  - name: p\n    experiments:\n"
        f"      - name: \"t{{i}}\"\n        cmd: \"{cmd}\"\n        mem: 1GB\n        time: 1s\n"
        f"        grid: {{i: {list(range(n))}}}\n{extra}"
    )
    return path


def floor(tmp: Path, n: int, slots: int = 4) -> float:
    """Seconds to start and reap n `bash -c true`, `slots` at a time, with no scheduler."""
    start = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for i in range(n):
        out = tmp / "floor" / f"t{i}"
        out.mkdir(parents=True)
        with open(out / "attempt-1.log", "ab", buffering=0) as log:
            running.append(subprocess.Popen(["bash", "-c", "true"], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True))
        if len(running) == slots:
            running.pop(0).wait()
    for p in running:
        p.wait()
    return time.perf_counter() - start


def _spread(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    """Median and range of repeated measurements (the machine is shared: single runs wander)."""
    v = sorted(x * scale for x in values)
    return f"{v[len(v) // 2]:.2f} {unit} (range {v[0]:.2f}-{v[-1]:.2f}, {len(v)} runs)"


def trivial(tmp: Path, n: int, repeat: int) -> None:
    overheads, cpus = [], []
    for k in range(repeat):
        manifest = grid_manifest(tmp / f"trivial{k}.yaml", f"trivial{k}", n)
        bare = floor(tmp / f"floor{k}", n)
        wall, cpu, _ = run_gpupack(manifest, "--gpus", "4x80GB", "--poll", "1")
        print(f"  {n} x `true`: gpupack {wall:.2f} s, floor {bare:.2f} s, scheduler CPU {cpu or 0:.2f} s")
        overheads.append((wall - bare) / n)
        cpus.append((cpu or 0.0) / n)
    print(f"{n} x `true` on 4 x 80 GB: overhead (wall - floor) / n = {_spread(overheads, 1e3, 'ms')} per "
          f"experiment (target <= 2 ms); scheduler CPU {_spread(cpus, 1e3, 'ms')} per experiment")


def rerun(tmp: Path, n: int, repeat: int) -> None:
    manifest = grid_manifest(tmp / "big.yaml", "big", n)
    t0 = time.perf_counter()
    run_gpupack(manifest, "--gpus", "16x80GB", "--poll", "1")
    print(f"  first run of {n} x `true` (16 GPUs, to build the run directory): {time.perf_counter() - t0:.1f} s")
    # The new experiment stamps the time it really runs: the engine's start event is stamped
    # just before the spawn, not when the process actually runs.
    grid_manifest(manifest, "big", n, extra="      - name: new\n        cmd: \"date +%s.%N > {out}/ran\"\n        mem: 1GB\n")
    firsts = []
    for k in range(repeat):
        if k:  # forget the new one's success so that it runs again
            subprocess.run(gpupack_cmd("reset", str(tmp / "runs" / "big"), "new"), env=env(), check=True,
                           stdout=subprocess.DEVNULL)
        start = time.time()
        wall, _, _ = run_gpupack(manifest, "--gpus", "16x80GB", "--poll", "1")
        ran = float((tmp / "runs" / "big" / "exp" / "new" / "ran").read_text())
        event = [t for t, kind, exp in events(tmp / "runs" / "big") if kind == "start" and exp == "new"][-1]
        print(f"  rerun: new experiment ran {ran - start:.2f} s after the command started (its start event "
              f"says {event - start:.2f} s); whole rerun {wall:.2f} s")
        firsts.append(ran - start)
    print(f"rerun over {n} finished + 1 new: first launch after {_spread(firsts)} (target <= 2 s)")


def steady(tmp: Path, seconds: float) -> None:
    manifest = grid_manifest(tmp / "steady.yaml", "steady", 4, cmd=f"sleep {seconds + 30}")
    manifest.write_text(manifest.read_text().replace("mem: 1GB", "mem: 70GB"))
    proc = subprocess.Popen(gpupack_cmd("run", str(manifest), "--gpus", "4x80GB", "--no-report", "--grace", "1"),
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp / "runs" / "steady" / "state.db"
    deadline = time.monotonic() + 60
    while not (db.exists() and sum(kind == "start" for _, kind, _ in events(tmp / "runs" / "steady")) == 4):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the steady-state run did not start its 4 experiments")
        time.sleep(0.2)
    time.sleep(1)  # the tick after the launches (dashboard, samples) is start-up, not steady state
    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    rss = []
    while time.perf_counter() - t0 < seconds:
        rss.append(rss_bytes(proc.pid) or 0)
        time.sleep(1)
    cpu1, t1 = cpu_seconds(proc.pid), time.perf_counter()
    proc.terminate()
    proc.wait()
    share = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else float("nan")
    resolution = 1 / CLOCK_TICKS / (t1 - t0)
    print(f"steady state, 4 GPUs busy, {seconds:.0f} s: scheduler CPU {share * 100:.2f}% of a core "
          f"(resolution {resolution * 100:.2f}%; target < 2%), RSS max {max(rss) / 1e6:.1f} MB (target < 100 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rerun", type=int, default=10000)
    parser.add_argument("--steady", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trivial(tmp, args.n, args.repeat)
        rerun(tmp, args.rerun, args.repeat)
        steady(tmp, args.steady)


if __name__ == "__main__":
    main()
