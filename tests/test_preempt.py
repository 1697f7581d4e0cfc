"""Preemption reaches the trainer, not its children: real `gpupack run`, real process trees.

The preempt signal goes to the experiment's command alone (README "What an experiment sees");
its DataLoader-like workers, which handle no signal, must still run while it checkpoints."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from conftest import ROOT, by_name, gpupack, gpupack_env, start_gpupack, started, wait_for

ENV = gpupack_env(GPUPACK_GPUS="2x80GB")
TRAINER = f"python3 {ROOT}/tests/bin/trainer.py"


def test_trainer_checkpoints_with_its_workers_alive_then_resumes(write_manifest, tmp_path: Path) -> None:
    m = write_manifest(f"""
        name: trainers
        defaults: {{mem: 10GB, resumable: true}}
        phases:
          - name: p
            experiments:
              - name: simple
                cmd: {TRAINER} 3000
              # bash stays in front of a compound command: the signal is for the program it runs
              - name: compound
                cmd: cd {tmp_path} && {TRAINER} 3000
              # one source of truth: what gpupack sends is what gpupack.job in the trainer awaits
              - name: usr1
                cmd: {TRAINER} 3000
                env: {{GPUPACK_PREEMPT_SIGNAL: USR1}}
        """)
    run_dir = tmp_path / "runs" / "trainers"
    names = ("simple", "compound", "usr1")
    proc = start_gpupack("run", str(m), "--poll", "1", "--grace", "20", "--no-report", env=ENV)
    wait_for(lambda: all(started(run_dir, n).exists() for n in names), what="the trainers and their workers")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    rows = by_name(run_dir)
    for name in names:
        ckpt = json.loads((run_dir / "exp" / name / "checkpoint.json").read_text())
        assert ckpt["workers_alive"] == 4, (name, ckpt)
        assert ckpt["step"] > 0
        assert rows[name]["state"] == "interrupted"
    assert rows["simple"]["exit_code"] == 128 + signal.SIGUSR2
    assert rows["usr1"]["exit_code"] == 128 + signal.SIGUSR1

    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in names:
        ckpt = json.loads((run_dir / "exp" / name / "checkpoint.json").read_text())
        results = json.loads((run_dir / "exp" / name / "results.json").read_text())
        assert results == {"steps": 3000, "resumed_from": ckpt["step"]}, name


def test_a_preempt_signal_nobody_knows_is_refused(write_manifest, tmp_path: Path) -> None:
    m = write_manifest("""
        name: badsig
        phases:
          - name: p
            experiments:
              - name: a
                cmd: "true"
                env: {GPUPACK_PREEMPT_SIGNAL: USR9}
        """)
    done = gpupack("run", str(m), "--no-report", env=ENV)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpupack: error: {m}: a: env.GPUPACK_PREEMPT_SIGNAL: unknown signal 'USR9' (expected a name like USR2 or a number)"
    ]
    assert not (tmp_path / "runs" / "badsig" / "state.db").exists()


def test_a_wall_clock_step_during_the_grace_period_does_not_cut_it_short(tmp_path: Path) -> None:
    """NTP steps the wall clock a day ahead at every look once the run stops: the grace period,
    on the monotonic clock, still lets the trainer checkpoint."""
    import threading
    import time

    from gpupack.engine import EXIT_STOPPED, Engine, RunOptions
    from gpupack.gpus import SimulatedProbe, parse_gpu_spec
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load_text
    from gpupack.store import Store

    manifest = load_text(
        f"name: ntp\nphases: [{{name: p, experiments: [{{name: t, cmd: '{TRAINER} 3000', mem: 1GB, resumable: true}}]}}]\n",
        tmp_path / "m.yaml",
    )
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    inventory = parse_gpu_spec("1x80GB", "n0")
    steps = [0]

    def wall() -> float:
        if engine.signals.reason is not None:
            steps[0] += 1
        return time.time() + 86400.0 * steps[0]

    engine = Engine(manifest, store, SimulatedProbe(inventory), LocalLauncher(), inventory,
                    RunOptions(poll_s=0.05, grace_s=30), clock=wall)
    engine.prepare()

    def stop_when_started() -> None:
        wait_for(started(manifest.run_dir, "t").exists, what="the trainer")
        engine.signals.count += 1
        engine.signals.reason = "terminated (TERM)"

    stopper = threading.Thread(target=stop_when_started)
    stopper.start()
    assert engine.run() == EXIT_STOPPED
    stopper.join()
    engine.close(EXIT_STOPPED)
    ckpt = json.loads((manifest.run_dir / "exp" / "t" / "checkpoint.json").read_text())
    assert ckpt["workers_alive"] == 4
    assert store.experiment_states() == {"t": "interrupted"}
    store.close()


def test_an_experiment_that_ends_as_the_stop_signal_arrives_is_interrupted_not_failed(write_manifest, tmp_path: Path) -> None:
    """Slurm signals every step with the batch step (scancel, time limit): gpupack may see the
    signal and the experiment's exit in one wake-up. Made certain here: the experiment stops
    gpupack (SIGSTOP), exits 3, and a helper sends TERM and CONT once its exit is recorded."""
    exit_file = tmp_path / "runs" / "edge" / "exp" / "a" / ".attempt-1.exit"
    m = write_manifest(f"""
        name: edge
        phases:
          - name: p
            experiments:
              - name: a
                mem: 1GB
                cmd: >-
                  P=$(cut -d' ' -f4 /proc/$PPID/stat); kill -STOP $P;
                  setsid sh -c 'while [ ! -s {exit_file} ]; do sleep 0.01; done; kill -TERM $0; kill -CONT $0' $P &
                  exit 3
        """)
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV)
    assert done.returncode == 3, done.stdout + done.stderr  # stopped, not failed
    row = by_name(tmp_path / "runs" / "edge")["a"]
    assert (row["state"], row["exit_code"]) == ("interrupted", 3)


def test_an_experiment_killed_by_a_signal_moments_before_gpupack_is_stopped_is_interrupted(tmp_path: Path) -> None:
    """A preemption signals every process of the job: the experiment may die of it a moment before
    gpupack hears its own. Here the experiment kills itself with TERM, and gpupack gets TERM once
    it has seen that death (engine.KILLED_VERDICT_DELAY_S); without that stop it has failed."""
    import os
    import threading

    from gpupack.engine import EXIT_STOPPED, Engine, RunOptions
    from gpupack.gpus import SimulatedProbe, parse_gpu_spec
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load_text
    from gpupack.store import Store

    manifest = load_text("name: killed\nphases: [{name: p, experiments: [{name: a, cmd: 'kill -TERM $$', mem: 1GB}]}]\n",
                         tmp_path / "m.yaml")
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    inventory = parse_gpu_spec("1x80GB", "n0")
    engine = Engine(manifest, store, SimulatedProbe(inventory), LocalLauncher(), inventory, RunOptions(poll_s=0.05))
    engine.prepare()
    engine.signals.install()

    def stop_once_its_death_is_seen() -> None:
        wait_for(lambda: (lambda r: r is not None and r.killed_at is not None)(engine.running.get("a")),
                 what="the engine to see the experiment's death")
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_its_death_is_seen)
    stopper.start()
    try:
        assert engine.run() == EXIT_STOPPED
    finally:
        stopper.join()
        engine.close(EXIT_STOPPED)
    assert store.experiment_states() == {"a": "interrupted"}
    store.close()


def test_an_experiment_killed_by_a_signal_with_no_stop_following_has_failed(write_manifest, tmp_path: Path) -> None:
    m = write_manifest("""
        name: killed
        phases: [{name: p, experiments: [{name: a, cmd: 'kill -TERM $$', mem: 1GB}]}]
        """)
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV)
    assert done.returncode == 1, done.stdout + done.stderr
    row = by_name(tmp_path / "runs" / "killed")["a"]
    assert (row["state"], row["exit_code"]) == ("failed", 128 + signal.SIGTERM)
