"""Scheduler overhead, measured with simulated GPUs (no GPU needed):

1. 1,000 trivial experiments (`true`) on 4 x 80 GB: overhead per experiment = (wall time - the
   floor) / n, where the floor is what starting the same 1,000 `bash -c true` costs this machine
   without a scheduler (a bare loop, four at a time, each with its own directory and log file, as
   the run directory's contract asks); and the scheduler's own CPU per experiment (its process
   only: the experiments' CPU is theirs).
2. Whole commands, from exec to exit, as a user waits for them (report included, 4 x 80 GB):
   a first run of 1,000 `true`; a first run of 10,000 (its peak RSS); a rerun of the 10,000
   finished; `status`, `status --json`, `results` and `report` on them; a rerun of the 10,000
   plus one new experiment: time from exec to the moment the new one runs (it writes the time
   itself); `watch --interval 1` in a terminal (a pty) on a live run of the 10,000 finished plus
   4 running: its CPU share.
3. Steady state while 4 GPUs are busy (4 long sleeps): the scheduler's CPU share and RSS.

    python benchmarks/overhead.py [--n 1000] [--rerun 10000] [--steady 30] [--watch 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
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


def whole(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds from exec to exit and peak RSS in MB of one whole command (its own process:
    wait4 reports the child's maximum resident set)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd[2:])} failed ({proc.returncode}): {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024


def _target(value: float, limit: float) -> str:
    return f"(target <= {limit:g}: {'met' if value <= limit else 'NOT met'})"


def whole_commands(tmp: Path, n: int, big: int, repeat: int, watch_s: float) -> None:
    gpus = ("--gpus", "4x80GB", "--poll", "1")
    walls = []
    for k in range(repeat):
        manifest = grid_manifest(tmp / f"first{k}.yaml", f"first{k}", n)
        walls.append(whole(gpupack_cmd("run", str(manifest), *gpus))[0])
    print(f"whole `gpupack run` of {n} x `true`, first run, report included: {_spread(walls)} "
          f"{_target(sorted(walls)[len(walls) // 2], 2.5 * n / 1000)}")
    manifest = grid_manifest(tmp / "big.yaml", "big", big)
    wall, rss = whole(gpupack_cmd("run", str(manifest), *gpus))
    print(f"  first run of {big} x `true` (to build the run directory): {wall:.1f} s, peak RSS {rss:.0f} MB "
          f"{_target(rss, 150)}")
    reruns, rsss = [], []
    for _ in range(repeat):
        wall, rss = whole(gpupack_cmd("run", str(manifest), *gpus))
        reruns.append(wall)
        rsss.append(rss)
    print(f"whole rerun over {big} finished: {_spread(reruns)} {_target(sorted(reruns)[len(reruns) // 2], 2)}, "
          f"peak RSS {max(rsss):.0f} MB")
    run_dir = str(tmp / "runs" / "big")
    for words, limit in (
        (("status", run_dir), 0.5), (("status", run_dir, "--json"), 0.5), (("results", run_dir), 1.0), (("report", run_dir), 2.0),
    ):
        times = [whole(gpupack_cmd(*words))[0] for _ in range(repeat)]
        print(f"`gpupack {' '.join(words).replace(run_dir, 'RUN')}` on {big}: {_spread(times)} "
              f"{_target(sorted(times)[len(times) // 2], limit)}")
    rerun(tmp, manifest, big, repeat)
    watch(tmp, manifest, big, watch_s)


def rerun(tmp: Path, manifest: Path, n: int, repeat: int) -> None:
    """The rerun over n finished + 1 new: until the new experiment itself runs. It stamps the time
    it really runs: the engine's start event is stamped just before the spawn."""
    grid_manifest(manifest, "big", n, extra="      - name: new\n        cmd: \"date +%s.%N > {out}/ran\"\n        mem: 1GB\n")
    firsts = []
    for k in range(repeat):
        if k:  # forget the new one's success so that it runs again
            subprocess.run(gpupack_cmd("reset", str(tmp / "runs" / "big"), "new"), env=env(), check=True,
                           stdout=subprocess.DEVNULL)
        start = time.time()
        wall, _ = whole(gpupack_cmd("run", str(manifest), "--gpus", "4x80GB", "--poll", "1"))
        ran = float((tmp / "runs" / "big" / "exp" / "new" / "ran").read_text())
        event = [t for t, kind, exp in events(tmp / "runs" / "big") if kind == "start" and exp == "new"][-1]
        print(f"  rerun: new experiment ran {ran - start:.2f} s after exec (its start event "
              f"says {event - start:.2f} s); whole rerun {wall:.2f} s")
        firsts.append(ran - start)
    print(f"rerun over {n} finished + 1 new: the new one runs {_spread(firsts)} after exec "
          f"{_target(sorted(firsts)[len(firsts) // 2], 1.5)}")


def watch(tmp: Path, manifest: Path, n: int, seconds: float) -> None:
    """`gpupack watch --interval 1` in a pty (the live view a person sees) on a live run of n
    finished experiments and 4 running ones: watch's CPU share, its start-up excluded."""
    grid_manifest(manifest, "big", n, extra="      - name: \"long{j}\"\n        cmd: \"sleep 600\"\n        mem: 1GB\n"
                  "        grid: {j: [1, 2, 3, 4]}\n")
    run = subprocess.Popen(gpupack_cmd("run", str(manifest), "--gpus", "4x80GB", "--no-report", "--grace", "1"),
                           env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp / "runs" / "big"
    deadline = time.monotonic() + 120
    while sum(kind == "start" and (exp or "").startswith("long") for _, kind, exp in events(run_dir)) < 4:
        if time.monotonic() > deadline or run.poll() is not None:
            raise SystemExit("the run for `watch` did not start its 4 experiments")
        time.sleep(0.2)
    controller, terminal = os.openpty()
    viewer = subprocess.Popen(gpupack_cmd("watch", str(run_dir), "--interval", "1"), env=env(COLUMNS="120", LINES="40"),
                              stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    drained = threading.Thread(target=_drain, args=(controller,), daemon=True)
    drained.start()
    time.sleep(3)  # start-up (imports, the first view) is not the refresh cost
    cpu0, sched0, t0 = cpu_seconds(viewer.pid), cpu_seconds(run.pid), time.perf_counter()
    rss = []
    while time.perf_counter() - t0 < seconds:
        rss.append(rss_bytes(run.pid) or 0)
        time.sleep(1)
    cpu1, sched1, t1 = cpu_seconds(viewer.pid), cpu_seconds(run.pid), time.perf_counter()
    viewer.terminate()
    viewer.wait()
    run.terminate()
    run.wait()
    os.close(controller)
    share = (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else float("nan")
    print(f"`gpupack watch --interval 1` in a terminal on {n} finished + 4 running, {seconds:.0f} s: "
          f"{share * 100:.1f}% of a core (target < 10%)")
    if sched0 is not None and sched1 is not None:
        print(f"  meanwhile the scheduler of that run (off a terminal, publishing its snapshot): "
              f"{(sched1 - sched0) / (t1 - t0) * 100:.1f}% of a core, RSS {max(rss) / 1e6:.0f} MB")


def _drain(fd: int) -> None:
    """Read the pty so that watch never blocks on a full terminal."""
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


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
    parser.add_argument("--watch", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trivial(tmp, args.n, args.repeat)
        whole_commands(tmp, args.n, args.rerun, args.repeat, args.watch)
        steady(tmp, args.steady)


if __name__ == "__main__":
    main()
