"""simulate.py: hand-computed timelines, the lower bound never above a simulated makespan, and
the `plan --json` contract."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import gpupack, gpupack_env
from gpupack.gpus import parse_gpu_spec
from gpupack.manifest import load_text
from gpupack.simulate import plan_data, simulate


def manifest(tmp_path: Path, text: str):
    return load_text(textwrap.dedent(text), tmp_path / "m.yaml")


def times(plan) -> dict[str, tuple[float | None, float | None]]:
    return {p.name: (p.start_s, p.end_s) for p in plan.experiments}


def test_two_full_util_jobs_sharing_a_gpu_run_at_half_speed(tmp_path):
    m = manifest(tmp_path, """
        name: share
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 30GB, time: 1h}
              - {name: b, cmd: "true", mem: 30GB, time: 1h}
        """)
    plan = simulate(m, parse_gpu_spec("1x80GB", "n"))
    # both start at once (60 <= 80 GB); utils sum to 2: each at 1/2 speed -> both end at 2 h
    assert times(plan) == {"a": (0.0, 7200.0), "b": (0.0, 7200.0)}
    assert plan.lower_bound_s == 7200.0  # util area: (1 h + 1 h) / 1 GPU


def test_light_jobs_share_without_slowing(tmp_path):
    m = manifest(tmp_path, """
        name: light
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 30GB, time: 1h, util: 0.5}
              - {name: b, cmd: "true", mem: 30GB, time: 1h, util: 0.4}
        """)
    plan = simulate(m, parse_gpu_spec("1x80GB", "n"))
    assert times(plan) == {"a": (0.0, 3600.0), "b": (0.0, 3600.0)}


def test_barrier_dependencies_and_gang(tmp_path):
    m = manifest(tmp_path, """
        name: dag
        defaults: {mem: 10GB, util: 0.2}
        phases:
          - name: train
            experiments:
              - {name: t, cmd: "true", time: 30m}
              - {name: long, cmd: "true", time: 2h}
          - name: eval
            experiments:
              - {name: e, cmd: "true", time: 10m, depends_on: [t]}
          - name: gen
            barrier: true
            experiments:
              - {name: g, cmd: "true", time: 1h, gpus: 2}
        """)
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    t = times(plan)
    assert t["e"] == (1800.0, 2400.0)  # right after its dependency, beside `long` (no barrier)
    assert t["g"] == (7200.0, 10800.0)  # the barrier waits for `long`; then both GPUs
    assert {k[1] for k in next(p for p in plan.experiments if p.name == "g").gpus} == {0, 1}
    assert plan.bounds["critical_path_s"] == 10800.0  # 2 h, then the barrier phase's 1 h


def test_time_limit_reports_what_would_not_start(tmp_path):
    m = manifest(tmp_path, """
        name: limit
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 70GB, time: 1h}
              - {name: b, cmd: "true", mem: 70GB, time: 1h}
              - {name: c, cmd: "true", mem: 70GB, time: 1h, resumable: true}
        """)
    data = plan_data(m, parse_gpu_spec("1x80GB", "n"), time_limit_s=5400)
    rows = {e["name"]: e for e in data["experiments"]}
    assert rows["a"]["end_s"] == 3600.0
    assert rows["b"]["start_s"] is None and "left in the allocation" in rows["b"]["why_not"]
    assert rows["c"]["start_s"] == 3600.0 and rows["c"]["late"]  # resumable: starts, ends after the limit
    assert data["fits"] is False


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 80), st.integers(1, 120), st.sampled_from([0.2, 0.5, 1.0]),
            st.integers(1, 2), st.booleans(), st.integers(0, 2),
        ),
        min_size=1, max_size=12,
    )
)
def test_lower_bound_never_exceeds_the_simulated_makespan(tmp_path_factory, jobs):
    lines = ["name: random", "phases:"]
    for phase in range(3):
        lines += [f"  - name: p{phase}", f"    barrier: {str(phase == 2).lower()}", "    experiments:"]
        lines += [
            f"      - {{name: j{i}, cmd: 'true', mem: {mem}GB, time: {minutes}m, util: {util}, gpus: {gpus}, exclusive: {str(excl).lower()}}}"
            for i, (mem, minutes, util, gpus, excl, ph) in enumerate(jobs) if ph == phase
        ]
        if lines[-1] == "    experiments:":
            lines += [f"      - {{name: filler{phase}, cmd: 'true', mem: 1GB, time: 1m}}"]
    m = load_text("\n".join(lines), tmp_path_factory.mktemp("m") / "m.yaml")
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    assert all(p.end_s is not None for p in plan.experiments)
    assert plan.lower_bound_s <= plan.makespan_s + 1e-6


def test_plan_json_contract(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent("""
        name: contract
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 30GB, time: 1h}
              - {name: b, cmd: "true", gpus: 2, mem: 30GB, time: 30m}
        """))
    done = gpupack("plan", str(path), "--gpus", "2x80GB", "--time", "24h", "--json", env=gpupack_env())
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for key in ("makespan_s", "lower_bound_s", "busy_fraction", "fits", "phases", "experiments"):
        assert key in data
    row = data["experiments"][0]
    for key in ("name", "start_s", "end_s", "gpus"):
        assert key in row
    assert data["makespan_s"] >= data["lower_bound_s"] > 0
    done = gpupack("plan", str(path), "--gpus", "2x80GB", env=gpupack_env())
    assert done.returncode == 0 and "lower bound" in done.stdout and "gpu1 |" in done.stdout
