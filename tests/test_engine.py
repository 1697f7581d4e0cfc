"""The core loop end to end: real `gpupack run` processes, real child processes, simulated GPUs."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from conftest import (
    alive,
    RECORD,
    by_name,
    gpupack,
    gpupack_env,
    max_overlap,
    seen,
    start_gpupack,
    started,
    status,
    wait_for,
)

ENV = gpupack_env(GPUPACK_GPUS="2x80GB")


def run(manifest: Path, *extra: str, env: dict[str, str] | None = None) -> "object":
    return gpupack("run", str(manifest), "--poll", "1", "--no-report", *extra, env=env or ENV)


def test_six_30gb_pack_two_per_gpu_never_three(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: pack
        phases:
          - name: p
            experiments:
              - name: "e{{i}}"
                cmd: {RECORD} 1.5
                grid: {{i: [1, 2, 3, 4, 5, 6]}}
                mem: 30GB
                time: 2s
        """)
    done = run(m)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "pack"
    rows = by_name(run_dir)
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for i in range(1, 7):
        s = seen(run_dir, f"e{i}")
        # what the experiment saw is what status says it got
        assert s["cvd"] == ",".join(str(g) for g in rows[f"e{i}"]["gpus"])
        per_gpu.setdefault(s["cvd"], []).append((s["start"], s["end"]))
    assert set(per_gpu) == {"0", "1"}
    # 30 + 30 <= 80 < 30 + 30 + 30: two per GPU at once, never three
    assert all(max_overlap(iv) == 2 for iv in per_gpu.values())


def test_exclusive_runs_alone_and_two_gpu_gang(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: excl
        phases:
          - name: p
            experiments:
              - name: lat
                cmd: {RECORD} 1
                mem: 5GB
                exclusive: true
                time: 10s
              - name: gang
                cmd: {RECORD} 0.5
                gpus: 2
                mem: 10GB
                time: 5s
              - name: "small{{i}}"
                cmd: {RECORD} 0.5
                grid: {{i: [1, 2, 3]}}
                mem: 5GB
                time: 1s
        """)
    done = run(m)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "excl"
    lat, gang = seen(run_dir, "lat"), seen(run_dir, "gang")
    assert gang["cvd"] in ("0,1", "1,0")
    for name in ("gang", "small1", "small2", "small3"):
        other = seen(run_dir, name)
        shares_gpu = lat["cvd"] in other["cvd"].split(",")
        overlaps = other["start"] < lat["end"] and lat["start"] < other["end"]
        assert not (shares_gpu and overlaps), f"{name} shared the exclusive GPU"


def test_dependencies_and_skip_on_failure(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: deps
        defaults: {{mem: 10GB, time: 1s}}
        phases:
          - name: p
            experiments:
              - name: train
                cmd: {RECORD} 0.5
              - name: evaluate
                cmd: {RECORD} 0.1
                depends_on: [train]
              - name: broken
                cmd: exit 7
              - name: after-broken
                cmd: {RECORD} 0.1
                depends_on: ["brok*"]
        """)
    done = run(m)
    assert done.returncode == 1
    run_dir = tmp_path / "runs" / "deps"
    rows = by_name(run_dir)
    assert seen(run_dir, "evaluate")["start"] >= seen(run_dir, "train")["end"]
    assert rows["evaluate"]["state"] == "succeeded"
    assert rows["broken"]["state"] == "failed" and rows["broken"]["exit_code"] == 7
    assert rows["after-broken"]["state"] == "skipped" and rows["after-broken"]["attempts"] == 0
    assert "broken" in (rows["after-broken"]["reason"] or "")


def _phases(barrier: bool) -> str:
    return f"""
        name: barrier
        defaults: {{mem: 10GB}}
        phases:
          - name: first
            experiments:
              - name: long
                cmd: {RECORD} 2
                time: 2s
          - name: second
            barrier: {str(barrier).lower()}
            experiments:
              - name: next
                cmd: {RECORD} 0.1
                time: 1s
        """


def test_backfill_without_barrier_and_wait_with_barrier(write_manifest, tmp_path):
    for barrier in (False, True):
        m = write_manifest(_phases(barrier), name=f"b{barrier}.yaml")
        run_dir = tmp_path / "runs" / "barrier"
        done = run(m)
        assert done.returncode == 0, done.stdout + done.stderr
        rows = by_name(run_dir)
        long, nxt = (seen(run_dir, n, rows[n]["attempts"]) for n in ("long", "next"))
        if barrier:
            assert nxt["start"] >= long["end"]
        else:
            assert nxt["start"] < long["end"]  # the idle second GPU was used at once
        assert gpupack("reset", str(run_dir), env=ENV).returncode == 0


def test_outputs_are_checked(write_manifest, tmp_path):
    m = write_manifest("""
        name: outputs
        defaults: {mem: 10GB}
        phases:
          - name: p
            experiments:
              - name: missing
                cmd: "true"
                outputs: ["{out}/results.json"]
              - name: not-json
                cmd: echo '{{broken' > {out}/results.json
                outputs: ["{out}/results.json"]
              - name: good
                cmd: python3 -c 'import json; json.dump(dict(a=1), open("{out}/results.json", "w"))'
                outputs: ["{out}/results.json"]
        """)
    done = run(m)
    assert done.returncode == 1
    rows = by_name(tmp_path / "runs" / "outputs")
    assert rows["missing"]["state"] == "failed" and "missing" in rows["missing"]["reason"]
    assert rows["not-json"]["state"] == "failed" and "JSON" in rows["not-json"]["reason"]
    assert rows["good"]["state"] == "succeeded"


def test_retries_count_attempts_and_logs(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: retries
        defaults: {{mem: 10GB}}
        phases:
          - name: p
            experiments:
              - name: flaky
                cmd: {RECORD} 0 --fail-attempts 1
                retries: 1
              - name: hopeless
                cmd: {RECORD} 0 --fail-attempts 9
                retries: 2
        """)
    done = run(m)
    assert done.returncode == 1
    run_dir = tmp_path / "runs" / "retries"
    rows = by_name(run_dir)
    assert rows["flaky"]["state"] == "succeeded" and rows["flaky"]["attempts"] == 2
    assert rows["hopeless"]["state"] == "failed" and rows["hopeless"]["attempts"] == 3
    logs = sorted(p.name for p in (run_dir / "exp" / "flaky").glob("attempt-*.log"))
    assert logs == ["attempt-1.log", "attempt-2.log"]
    assert "failing on purpose" in (run_dir / "exp" / "flaky" / "attempt-1.log").read_text()


def test_oom_is_retried_with_a_larger_budget_without_using_a_retry(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: oom
        phases:
          - name: p
            experiments:
              - name: hungry
                cmd: {RECORD} 0 --oom
                mem: 40GB
              - name: plain-failure
                cmd: {RECORD} 0 --fail-attempts 1
                mem: 10GB
        """)
    done = run(m)
    assert done.returncode == 1
    run_dir = tmp_path / "runs" / "oom"
    db = sqlite3.connect(run_dir / "state.db")
    rows = db.execute("SELECT number, budget_bytes, oom FROM attempts WHERE experiment='hungry' ORDER BY number").fetchall()
    # 40 -> 50 -> 62.5 -> 78.1 GB (1.25x each time, capped at the 80 GB GPU), then an ordinary failure
    assert [r[1] for r in rows] == [40_000_000_000, 50_000_000_000, 62_500_000_000, 78_125_000_000]
    assert all(r[2] == 1 for r in rows)
    plain = db.execute("SELECT oom FROM attempts WHERE experiment='plain-failure'").fetchall()
    assert plain == [(0,)]  # a non-OOM failure never masquerades as OOM (and has no retries)


def test_sigterm_interrupts_then_rerun_resumes_and_skips(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: preempt
        defaults: {{mem: 10GB}}
        phases:
          - name: p
            experiments:
              - name: quick
                cmd: {RECORD} 0
              - name: slow
                cmd: {RECORD} 60 --resumed-seconds 0
                resumable: true
        """)
    run_dir = tmp_path / "runs" / "preempt"
    proc = start_gpupack("run", str(m), "--poll", "1", "--grace", "10", "--no-report", env=ENV)
    wait_for(lambda: started(run_dir, "slow").exists() and (run_dir / "exp" / "quick" / "seen-1.json").exists(), what="start")
    wait_for(lambda: by_name(run_dir)["quick"]["state"] == "succeeded", what="quick to be reaped")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    slow = seen(run_dir, "slow")
    assert slow["preempted"]  # it got the preempt signal (SIGUSR2) and could checkpoint
    assert by_name(run_dir)["slow"]["state"] == "interrupted"

    done = run(m)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = by_name(run_dir)
    assert rows["quick"]["attempts"] == 1  # finished work is skipped
    again = json.loads(started(run_dir, "slow", 2).read_text())
    assert again["resume"] == "1" and again["attempt"] == 2
    assert (run_dir / "exp" / "slow" / "attempt-2.log").exists()


def test_preempt_ignorer_is_killed_after_grace_with_its_children(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: stubborn
        phases:
          - name: p
            experiments:
              - name: stubborn
                cmd: {RECORD} 120 --ignore-preempt --child
                mem: 10GB
        """)
    run_dir = tmp_path / "runs" / "stubborn"
    proc = start_gpupack("run", str(m), "--poll", "1", "--grace", "1", "--no-report", env=ENV)
    wait_for(lambda: started(run_dir, "stubborn").exists(), what="start")
    info = json.loads(started(run_dir, "stubborn").read_text())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    for pid in (info["pid"], info["child"]):
        wait_for(lambda: not alive(pid), timeout=5, what=f"pid {pid} to die")
    assert by_name(run_dir)["stubborn"]["state"] == "interrupted"


def test_changed_command_runs_again_and_says_so(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: change
        phases:
          - name: p
            experiments:
              - name: a
                cmd: {RECORD} 0
                mem: 10GB
        """)
    assert run(m).returncode == 0
    assert run(m).returncode == 0
    run_dir = tmp_path / "runs" / "change"
    assert by_name(run_dir)["a"]["attempts"] == 1
    m.write_text(m.read_text().replace("record.py 0", "record.py 0.01"))
    done = run(m)
    assert done.returncode == 0
    assert "a changed" in done.stdout
    assert by_name(run_dir)["a"]["attempts"] == 2


def test_second_run_on_same_directory_is_refused(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: busy
        phases:
          - name: p
            experiments:
              - name: a
                cmd: {RECORD} 60
                mem: 10GB
        """)
    run_dir = tmp_path / "runs" / "busy"
    first = start_gpupack("run", str(m), "--grace", "2", "--no-report", env=ENV)
    try:
        wait_for(lambda: started(run_dir, "a").exists(), what="start")
        second = run(m)
        assert second.returncode == 2
        assert "another gpupack run is using this run directory" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 3


def test_bad_manifest_exit_2_names_file_experiment_field(write_manifest, tmp_path):
    m = write_manifest("""
        name: bad
        phases:
          - name: p
            experiments:
              - name: x
                cmd: "true"
                mem: 60GX
              - name: y
                cmd: "true"
                gpus: 9
                mem: 10GB
        """)
    done = run(m)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{m}: x: mem:" in done.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # refused before anything ran
    m.write_text(m.read_text().replace("60GX", "10GB"))
    done = run(m)
    assert done.returncode == 2 and f"{m}: y: gpus:" in done.stderr, done.stderr


def test_status_json_contract(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: contract
        phases:
          - name: p
            experiments:
              - name: a
                cmd: {RECORD} 0
                mem: 10GB
        """)
    assert run(m).returncode == 0
    data = status(tmp_path / "runs" / "contract")
    assert data["run"] == "contract"
    row = data["experiments"][0]
    for key in ("name", "phase", "state", "attempts", "gpus", "node", "started_at", "ended_at", "exit_code"):
        assert key in row
    assert row["state"] == "succeeded" and row["exit_code"] == 0 and row["ended_at"] >= row["started_at"]
    assert os.path.exists(tmp_path / "runs" / "contract" / "manifest.yaml")


def test_estimates_are_learned_from_grid_siblings():
    from gpupack.estimates import Learned

    learned = Learned()
    assert learned.time_s("train-{seed}", 3600.0) == 3600.0  # nothing learned yet: the declaration
    for duration in (100.0, 300.0, 200.0):
        learned.add("train-{seed}", duration, 30 * 10**9)
    assert learned.time_s("train-{seed}", 3600.0) == 200.0  # the median of the family
    assert learned.time_s("other", None) is None
    assert learned.mem_bytes("train-{seed}", 20 * 10**9) == 30 * 10**9  # raised to the observed peak
    assert learned.mem_bytes("train-{seed}", 40 * 10**9) == 40 * 10**9  # never lowered
    assert learned.mem_bytes("train-{seed}", None) is None  # unknown stays "alone on a GPU"


def test_failures_are_retried_by_a_new_run_but_not_by_a_requeued_job(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: again
        phases:
          - name: p
            experiments:
              - {{name: bad, cmd: "{RECORD} 0 --fail-attempts 1", mem: 1GB}}
        """)
    assert run(m).returncode == 1
    run_dir = tmp_path / "runs" / "again"
    # A requeued job (Slurm restart count 1) runs the engine with retry_failed off: nothing runs.
    from gpupack.engine import Engine, RunOptions
    from gpupack.gpus import SimulatedProbe, parse_gpu_spec
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load
    from gpupack.slurm import Allocation, SlurmMissing
    from gpupack.slurm_requeue import engine_hooks
    from gpupack.store import Store

    def no_slurm(argv: Sequence[str]) -> str:
        raise SlurmMissing(argv, "no Slurm here")

    requeued = Allocation("7", ("n0",), (0,), (4,), restart_count=1)
    hooks = engine_hooks(requeued, 10, run_args=[], run=no_slurm)
    assert hooks.retry_failed is False
    inventory = parse_gpu_spec("2x80GB", "n0")
    store = Store(run_dir / "state.db")
    engine = Engine(load(m), store, SimulatedProbe(inventory), LocalLauncher(), inventory, RunOptions(poll_s=0.1), hooks)
    engine.prepare()
    assert engine.run() == 1
    engine.close(1)
    store.close()
    assert by_name(run_dir)["bad"]["attempts"] == 1 and by_name(run_dir)["bad"]["state"] == "failed"
    done = run(m)  # a new run: tried again, and this time it succeeds
    assert done.returncode == 0, done.stdout + done.stderr
    assert by_name(run_dir)["bad"]["attempts"] == 2


def test_report_is_rewritten_only_when_the_run_changed_something(write_manifest, tmp_path):
    text = """
        name: rep
        phases:
          - name: p
            experiments:
              - name: "e{i}"
                cmd: "true"
                grid: {i: [1, 2]}
                mem: 1GB
        """
    m = write_manifest(text)
    html = tmp_path / "runs" / "rep" / "report" / "report.html"
    first = gpupack("run", str(m), "--poll", "1", env=ENV)
    assert first.returncode == 0 and f"report: {html}\n" in first.stdout, first.stdout + first.stderr
    assert not html.with_name("timeline.png").exists()  # `gpupack report` draws the PNG, not `run`
    written = html.stat().st_ino  # each write is a new file renamed into place
    again = gpupack("run", str(m), "--poll", "1", env=ENV)
    assert again.returncode == 0 and "(nothing changed)" in again.stdout, again.stdout
    assert html.stat().st_ino == written
    write_manifest(text.replace("[1, 2]", "[1, 2, 3]"))
    grown = gpupack("run", str(m), "--poll", "1", env=ENV)
    assert grown.returncode == 0 and "(nothing changed)" not in grown.stdout, grown.stdout
    assert html.stat().st_ino != written and "e3" in html.read_text()


def test_what_only_waits_for_time_stops_the_run_and_requeues(tmp_path):
    """The decision rests on the policy's reason kind (Wait.TIME_LEFT), not on its wording."""
    from gpupack.engine import EXIT_STOPPED, Engine, Hooks, RunOptions
    from gpupack.gpus import SimulatedProbe, parse_gpu_spec
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load_text
    from gpupack.store import Store

    manifest = load_text(
        "name: t\nphases: [{name: p, experiments: [{name: long, cmd: 'true', mem: 1GB, time: 2h}]}]\n",
        tmp_path / "m.yaml",
    )
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    requeued: list[bool] = []
    hooks = Hooks(time_left=lambda now: 600.0, requeue=lambda: requeued.append(True) or "requeued")
    inventory = parse_gpu_spec("1x80GB", "n0")
    engine = Engine(manifest, store, SimulatedProbe(inventory), LocalLauncher(), inventory, RunOptions(poll_s=0.05), hooks)
    engine.prepare()
    assert engine.run() == EXIT_STOPPED
    engine.close(EXIT_STOPPED)
    assert requeued == [True]
    assert store.experiment_states() == {"long": "pending"}
    store.close()
