"""Learned times after a resume: an experiment's duration is the sum of the attempts it resumed,
read back from the store (a restarted scheduler) and learned live (the engine's own reap)."""

from __future__ import annotations

from pathlib import Path

from gpupack.engine import Engine, RunOptions
from gpupack.gpus import SimulatedProbe, parse_gpu_spec
from gpupack.launch import LocalLauncher
from gpupack.manifest import load_text
from gpupack.store import A_FAILED, A_INTERRUPTED, A_SUCCEEDED, FAILED, INTERRUPTED, SUCCEEDED, ExperimentRow, Store

HOUR = 3600.0


def attempt(store: Store, name: str, number: int, t0: float, t1: float, state: str) -> None:
    after = {A_INTERRUPTED: INTERRUPTED, A_SUCCEEDED: SUCCEEDED, A_FAILED: FAILED}[state]
    attempt_id = store.begin_attempt(name, number, None, "n", (0,), f"/x/{name}-{number}.log", None, t0)
    store.end_attempt(attempt_id, state, 0, t1, after)


def test_a_resumed_experiment_took_the_sum_of_its_attempts(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.sync_experiments([ExperimentRow(n, "p", "t", i, "f", "pending", None, {}, {}, True) for i, n in enumerate("abc")])
    attempt(store, "a", 1, 0.0, 4 * HOUR, A_INTERRUPTED)  # preempted after 4 h
    attempt(store, "a", 2, 5 * HOUR, 5 * HOUR + 300, A_SUCCEEDED)  # a 5-minute tail
    attempt(store, "b", 1, 0.0, 100.0, A_FAILED)  # a failure: the retry starts afresh
    attempt(store, "b", 2, 100.0, 400.0, A_SUCCEEDED)
    attempt(store, "c", 1, 0.0, 50.0, A_INTERRUPTED)
    attempt(store, "c", 2, 50.0, 60.0, A_FAILED)  # resumed, then failed: the chain is broken
    attempt(store, "c", 3, 60.0, 160.0, A_SUCCEEDED)
    assert store.succeeded_runs() == [("a", 4 * HOUR + 300, None), ("b", 300.0, None), ("c", 100.0, None)]


def test_the_engine_learns_the_sum_when_a_resumed_attempt_ends(tmp_path: Path) -> None:
    manifest = load_text(
        "name: r\nphases: [{name: p, experiments: [{name: tail, cmd: 'true', mem: 1GB, resumable: true}]}]\n",
        tmp_path / "m.yaml",
    )
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    store.sync_experiments([ExperimentRow("tail", "p", "tail", 0, manifest.experiments[0].fingerprint, "pending", None, {}, {}, True)])
    attempt(store, "tail", 1, 0.0, 4 * HOUR, A_INTERRUPTED)
    inventory = parse_gpu_spec("1x80GB", "n0")
    engine = Engine(manifest, store, SimulatedProbe(inventory), LocalLauncher(), inventory, RunOptions(poll_s=0.1))
    engine.prepare()
    assert engine.learned.time_s("tail", None) is None  # nothing succeeded yet
    assert engine.run() == 0
    engine.close(0)
    learned = engine.learned.time_s("tail", None)
    assert learned is not None and 4 * HOUR <= learned < 4 * HOUR + 60
    assert abs(store.succeeded_runs()[0][1] - learned) < 1  # a restarted scheduler learns the same
    store.close()
