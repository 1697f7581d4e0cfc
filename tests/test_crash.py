"""Never lose work: the scheduler killed -9 at random moments, and preemption storms (TERM/USR1 at
random moments), each followed by a restart. Checked from the experiments' own ledger: nothing
that succeeded runs again, no experiment runs twice at once, every one ends succeeded exactly
once, results are whole, and state.db passes its integrity check."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import ROOT, gpupack_env, start_gpupack, status

ENV = gpupack_env(GPUPACK_GPUS="4x80GB")
N_EXPERIMENTS = 24
DURATIONS = [round(0.3 + 0.05 * i, 2) for i in range(N_EXPERIMENTS)]  # 0.3 .. 1.45 s


def _manifest(tmp_path: Path) -> Path:
    ledger = tmp_path / "ledger"
    text = f"""
name: storm
defaults: {{mem: 30GB, time: 1s, resumable: true}}
phases:
  - name: work
    experiments:
      - name: "job{{s}}"
        cmd: bash {ROOT}/tests/bin/ledger.sh {ledger} {{name}} {{s}}
        grid: {{s: {DURATIONS}}}
        outputs: ["{{out}}/results.json"]
"""
    path = tmp_path / "storm.yaml"
    path.write_text(text)
    return path


def _ledger(tmp_path: Path) -> list[tuple[str, str, int, str, float]]:
    lines = (tmp_path / "ledger").read_text().splitlines() if (tmp_path / "ledger").exists() else []
    rows = []
    for line in lines:
        kind, name, attempt, resume, t = line.split()
        rows.append((kind, name, int(attempt), resume, float(t)))
    return rows


def _check_no_twins_and_once(tmp_path: Path) -> dict[str, list[tuple[str, str, int, str, float]]]:
    by_name: dict[str, list[tuple[str, str, int, str, float]]] = defaultdict(list)
    for row in _ledger(tmp_path):
        by_name[row[1]].append(row)
    assert len(by_name) == N_EXPERIMENTS
    for name, rows in by_name.items():
        ends = [r for r in rows if r[0] == "end"]
        assert len(ends) == 1, f"{name} succeeded {len(ends)} times: {rows}"
        # attempts never overlap: each start comes after the previous attempt's end or preemption
        open_attempt = None
        for kind, _, attempt, _, _ in sorted(rows, key=lambda r: r[4]):
            if kind == "start":
                assert open_attempt is None, f"{name}: attempt {attempt} started while {open_attempt} ran"
                open_attempt = attempt
            else:
                open_attempt = None
    return by_name


def _final_checks(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "storm"
    rows = status(run_dir)["experiments"]
    assert {r["state"] for r in rows} == {"succeeded"}
    for r in rows:
        json.loads((run_dir / "exp" / r["name"] / "results.json").read_text())
    db = sqlite3.connect(run_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _running_now(tmp_path: Path) -> set[str]:
    """Experiments whose last ledger line is a start: running now."""
    last: dict[str, str] = {}
    for kind, name, *_ in _ledger(tmp_path):
        last[name] = kind
    return {name for name, kind in last.items() if kind == "start"}


def _run_until_done(tmp_path: Path, manifest: Path, disturb, seed: int, max_rounds: int = 40) -> int:
    """Start gpupack, let `disturb(proc, rng)` hit it, restart, until a run ends by itself."""
    rng = random.Random(seed)
    disturbed = 0
    for _ in range(max_rounds):
        proc = start_gpupack("run", str(manifest), "--poll", "0.5", "--grace", "5", "--no-report", env=ENV)
        if disturbed < max_rounds // 2 and disturb(proc, rng):
            disturbed += 1
            continue
        out, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            return disturbed
        assert proc.returncode == 3, out
    raise AssertionError("the plan never finished")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scheduler_killed_at_random_moments(tmp_path, seed):
    manifest = _manifest(tmp_path)

    mid_run: list[set[str]] = []  # per kill: the experiments that were running when it hit

    def kill9(proc, rng) -> bool:
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.2))
            return False  # finished before the kill
        except Exception:
            running = _running_now(tmp_path)
            proc.kill()  # SIGKILL: no handler, no cleanup, experiments keep running
            proc.wait()
            mid_run.append(running & _running_now(tmp_path))  # still running after the kill, too
            return True

    kills = _run_until_done(tmp_path, manifest, kill9, seed)
    by_name = _check_no_twins_and_once(tmp_path)
    _final_checks(tmp_path)
    # experiments survived the scheduler's death: each was started exactly once
    assert all(sum(1 for r in rows if r[0] == "start") == 1 for rows in by_name.values())
    hits = [names for names in mid_run if names]
    print(f"kills survived: {kills}, {len(hits)} of them while experiments ran ({sum(map(len, hits))} in all)")
    assert len(hits) >= 3  # a kill between experiments would test nothing


def test_preemption_storm(tmp_path):
    manifest = _manifest(tmp_path)

    def preempt(proc, rng) -> bool:
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.2))
            return False
        except Exception:
            proc.send_signal(rng.choice([signal.SIGTERM, signal.SIGUSR1]))
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode in (0, 3), out
            return proc.returncode == 3

    storms = _run_until_done(tmp_path, manifest, preempt, seed=20261122)
    by_name = _check_no_twins_and_once(tmp_path)
    _final_checks(tmp_path)
    preempted = [rows for rows in by_name.values() if any(r[0] == "preempted" for r in rows)]
    assert preempted, "no experiment was ever preempted: the storm tested nothing"
    for rows in preempted:
        # the attempt after a preemption resumes
        later = [r for r in rows if r[0] == "start" and r[2] > min(p[2] for p in rows if p[0] == "preempted")]
        assert later and all(r[3] == "resume=1" for r in later), rows
    print(f"preemptions survived: {storms}")
    assert storms >= 3
