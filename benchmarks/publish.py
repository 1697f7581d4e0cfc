"""What publishing for other hosts costs the scheduler, and what reading it costs a reader, on a
run of N finished experiments built through Store (no engine; milliseconds, median of --repeat):

- a tick that publishes status.json after attempts changed (the status rebuilt) and one after
  nothing changed (only the view), the heartbeat thread's rewrite, a database copy (online backup,
  then copied beside the run directory's file and renamed);
- a reader on another host: open_run (the snapshot) and its status.

    python benchmarks/publish.py [--n 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpupack import publish, reader  # noqa: E402
from gpupack.store import A_SUCCEEDED, PENDING, SUCCEEDED, ExperimentRow, Store  # noqa: E402


def build(run_dir: Path, n: int) -> Store:
    store = Store(run_dir / "state.db")
    spec = {"gpus": 1, "mem_bytes": 10**9, "time_s": 1.0}
    store.sync_experiments([ExperimentRow(f"t{i}", "p", "t{i}", i, "f", PENDING, None, spec, {"i": i}, True) for i in range(n)])
    store.begin_run(1, "compute-1", None, "", 0.0)
    with store.batch():
        for i in range(n):
            a = store.begin_attempt(f"t{i}", 1, 1, "n1", [i % 4], f"/x/t{i}/attempt-1.log", 10**9, float(i))
            store.attempt_launched(a, 1000 + i, None)
            store.end_attempt(a, A_SUCCEEDED, 0, i + 0.5, SUCCEEDED)
            store.event("finish", f"t{i}", f"t{i} succeeded in 0s on gpu{i % 4}", i + 0.5)
    return store


def ms(fn: Callable[[], object], repeat: int) -> str:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return f"{statistics.median(times):.0f} ms ({min(times):.0f}-{max(times):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="gpupack-publish-")) / "run"
    run_dir.mkdir()
    store = build(run_dir, args.n)
    pub = publish.Publisher(run_dir, store, 5.0, None)
    pub.tick(time.time(), force=True, copy=False)  # events.log written once, as a scheduler's first tick
    clock = [time.time()]

    def tick(changed: bool) -> None:
        clock[0] += 2
        if changed:
            store.event("info", None, "something changed", clock[0])
            pub._status_mark = None  # as if an attempt had begun or ended
        pub.tick(clock[0], copy=False)

    print(f"{args.n} experiments, state.db {(run_dir / 'state.db').stat().st_size / 1e6:.1f} MB (+ WAL)")
    print(f"tick, attempts changed (status rebuilt): {ms(lambda: tick(True), args.repeat)}")
    print(f"tick, nothing changed (view only):       {ms(lambda: tick(False), args.repeat)}")
    print(f"heartbeat rewrite:                       {ms(pub._write_locked, args.repeat)}")
    print(f"status.json: {(run_dir / 'status.json').stat().st_size / 1e6:.1f} MB")
    print(f"database copy:                           {ms(lambda: publish.copy_database(store, run_dir / 'snapshot.db', run_dir), args.repeat)}")
    doc = json.loads((run_dir / "status.json").read_text())
    doc["heartbeat"]["host"] = "another-host"  # the reader is elsewhere: it reads the snapshot
    (run_dir / "status.json").write_text(json.dumps(doc))

    def remote_status() -> None:
        source = reader.open_run(run_dir)
        assert source.source == "snapshot"
        source.status()

    print(f"reader elsewhere, open_run + status:     {ms(remote_status, args.repeat)}")


if __name__ == "__main__":
    main()
