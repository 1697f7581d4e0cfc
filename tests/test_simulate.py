"""simulate.py: hand-computed timelines, the lower bound never above a simulated makespan, and
the `plan --json` contract."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from conftest import gpupack, gpupack_env
from gpupack.gpus import parse_gpu_spec
from gpupack.manifest import load_text
from gpupack.simulate import DEFAULT_TIME_S, lanes, plan_data, render_plan, simulate


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
    assert plan.bound.lower_bound_s == 7200.0  # util area: (1 h + 1 h) / 1 GPU


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
    assert plan.bound.critical_path_s == 10800.0  # 2 h, then the barrier phase's 1 h


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


def test_a_gang_runs_at_the_rate_of_its_slowest_gpu(tmp_path):
    m = manifest(tmp_path, """
        name: gang
        defaults: {mem: 10GB, time: 1h}
        phases:
          - name: p
            experiments:
              - {name: g, cmd: "true", gpus: 2}
              - {name: x, cmd: "true"}
        """)
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    # x joins g on gpu0 (load 2 there, 1 on gpu1): g runs at min(1/2, 1) = 1/2, x at 1/2 -> both 2 h
    assert times(plan) == {"g": (0.0, 7200.0), "x": (0.0, 7200.0)}
    assert plan.bound.util_area_s == 5400.0  # (2 x 1 h + 1 h) / 2 GPUs
    assert plan.busy_fraction == 1.0


def test_unknown_time_stays_unknown_to_the_policy_and_is_assumed(tmp_path):
    m = manifest(tmp_path, """
        name: unknown
        defaults: {mem: 50GB}
        phases:
          - name: p
            experiments:
              - {name: u, cmd: "true"}
              - {name: k, cmd: "true", time: 10m}
        """)
    data = plan_data(m, parse_gpu_spec("1x80GB", "n"))
    rows = {e["name"]: e for e in data["experiments"]}
    # as in a run, an unknown time goes last among equals; the simulation then assumes 30 min
    assert (rows["k"]["start_s"], rows["u"]["start_s"], rows["u"]["end_s"]) == (0.0, 600.0, 600.0 + DEFAULT_TIME_S)
    assert data["assumed_time"] == ["u"]


def test_barrier_segments_add_up_in_the_bound(tmp_path):
    m = manifest(tmp_path, """
        name: segments
        defaults: {mem: 10GB, time: 1h}
        phases:
          - name: wide
            experiments:
              - {name: "w{i}", cmd: "true", grid: {i: [1, 2, 3, 4]}}
          - name: after
            barrier: true
            experiments:
              - {name: last, cmd: "true"}
        """)
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    # 4 jobs of 1 h at util 1 on 2 GPUs: 2 h; then the barrier phase: 1 h. Without segments the
    # best single bound is util area (5 h / 2 GPUs = 2.5 h).
    assert plan.makespan_s == 3 * 3600.0
    assert plan.bound.lower_bound_s == 3 * 3600.0 and plan.bound.segments == 2
    assert plan.bound.util_area_s == 2.5 * 3600.0


def test_energy_bound_counts_work_released_late(tmp_path):
    m = manifest(tmp_path, """
        name: energy
        defaults: {mem: 10GB, time: 1h}
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true"}
              - {name: "b{i}", cmd: "true", depends_on: [a], grid: {i: [1, 2, 3, 4]}}
        """)
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    # the b's cannot start before 1 h and hold 4 GPU-hours: 1 h + 4 h / 2 GPUs = 3 h, which is
    # what happens (two per GPU at half speed); util area says 2.5 h, critical path 2 h
    assert plan.makespan_s == plan.bound.lower_bound_s == 3 * 3600.0


def test_time_limit_json_says_what_the_whole_plan_needs(tmp_path):
    m = manifest(tmp_path, """
        name: limit
        defaults: {mem: 70GB, time: 1h}
        phases:
          - name: p
            experiments:
              - {name: "j{i}", cmd: "true", grid: {i: [1, 2, 3]}}
        """)
    data = plan_data(m, parse_gpu_spec("1x80GB", "n"), time_limit_s=7200)
    assert data["fits"] is False and data["needs_s"] == 3 * 3600.0
    assert [e["start_s"] for e in data["experiments"]] == [0.0, 3600.0, None]
    out = io.StringIO()
    render_plan(data, Console(file=out, width=100))
    assert "does NOT fit in 2h00m: the whole plan needs 3h00m" in out.getvalue()
    # j2 ends as the allocation does: j3 was last refused for memory, at 1 h
    assert "would not start: j3: the allocation ends first (last: no GPU with 70.0 GB free" in out.getvalue()


jobs = st.lists(
    st.tuples(
        st.sampled_from([None, 10, 40, 70]), st.sampled_from([None, 5, 30, 90]), st.sampled_from([0.2, 0.5, 1.0]),
        st.integers(0, 2), st.booleans(), st.integers(0, 2), st.sets(st.integers(0, 11), max_size=2),
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=30, deadline=None)
@given(jobs, st.booleans())
def test_lower_bound_never_exceeds_the_simulated_makespan(tmp_path_factory, jobs, barrier):
    """Random plans (memory or time unknown, CPU-only, gangs, exclusive, dependencies on earlier
    jobs, a barrier): every experiment runs, none faster than its time, and the bound holds."""
    lines = ["name: random", "phases:"]
    for phase in range(3):
        lines += [f"  - name: p{phase}", f"    barrier: {str(barrier and phase == 2).lower()}", "    experiments:"]
        for i, (mem, minutes, util, gpus, excl, ph, deps) in enumerate(jobs):
            if ph != phase:
                continue
            fields = [f"name: j{i}", "cmd: 'true'", f"util: {util}", f"gpus: {gpus}", f"exclusive: {str(excl).lower()}"]
            fields += [f"mem: {mem}GB"] if mem else []
            fields += [f"time: {minutes}m"] if minutes else []
            after = sorted(f"j{d}" for d in deps if d < i and jobs[d][5] <= ph)
            fields += [f"depends_on: [{', '.join(after)}]"] if after else []
            lines.append("      - {" + ", ".join(fields) + "}")
        if lines[-1] == "    experiments:":
            lines += [f"      - {{name: filler{phase}, cmd: 'true', mem: 1GB, time: 1m}}"]
    m = load_text("\n".join(lines), tmp_path_factory.mktemp("m") / "m.yaml")
    plan = simulate(m, parse_gpu_spec("2x80GB", "n"))
    for p, e in zip(plan.experiments, m.experiments):
        assert p.start_s is not None and p.end_s is not None, p
        assert p.end_s - p.start_s >= (e.time_s or DEFAULT_TIME_S) - 1e-6
    assert plan.bound.lower_bound_s <= plan.makespan_s + 1e-6


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


def test_plan_runs_whole_node_experiments_on_free_nodes_and_small_ones_around_them(tmp_path):
    m = load_text(textwrap.dedent("""
        name: nodes
        defaults: {mem: 20GB}
        phases:
          - name: p
            experiments:
              - {name: ddp, cmd: "true", nodes: 2, time: 2h}
              - {name: "s{i}", cmd: "true", time: 1h, grid: {i: [1, 2, 3, 4, 5, 6, 7, 8]}}
        """), tmp_path / "m.yaml", node_gpus=2)
    # 3 nodes of 2 GPUs: ddp (longest, first) takes n1 and n2 whole at 0; the 8 small ones share
    # n3's 2 GPUs, 4 on each (4 x 20 = 80 GB), at 1/4 speed: all end at 4 h.
    data = plan_data(m, parse_gpu_spec("3x2x80GB", "n"))
    rows = {e["name"]: e for e in data["experiments"]}
    assert (rows["ddp"]["nodes"], rows["ddp"]["gpus"], rows["ddp"]["end_s"]) == (["n1", "n2"], [0, 1], 7200.0)
    assert all(rows[f"s{i}"]["nodes"] == ["n3"] for i in range(1, 9))
    assert data["makespan_s"] == 4 * 3600.0
    lanes_text = "\n".join(lanes(data, width=8))
    assert "n2:gpu1 |aaaa....|" in lanes_text and "n3:gpu0 |AAAAAAAA|" in lanes_text


def test_plan_cli_refuses_more_nodes_than_the_gpus_have(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: n\nphases:\n  - name: p\n    experiments:\n      - {name: ddp, cmd: 'true', nodes: 3}\n")
    done = gpupack("plan", str(path), "--gpus", "2x4x80GB", env=gpupack_env())
    assert done.returncode == 2
    assert done.stderr.strip() == f"gpupack: error: {path}: ddp: nodes: needs 3 whole nodes of 4 GPUs; the allocation has 2"


def test_plan_refuses_a_grid_larger_than_it_simulates_in_one_line(tmp_path, capsys) -> None:
    from gpupack import cli, simulate

    n = simulate.MAX_EXPERIMENTS + 1
    manifest = tmp_path / "huge.yaml"
    manifest.write_text(f"name: huge\nphases:\n  - name: p\n    experiments:\n      - name: \"t{{i}}\"\n"
                        f"        cmd: \"true\"\n        mem: 1GB\n        grid: {{i: {list(range(n))}}}\n")
    assert cli.main(["plan", str(manifest)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"gpupack: error: {manifest}: {n} experiments, more than the {n - 1} `gpupack plan` simulates "
                   "(its cost grows with the square of their number); plan a smaller grid of the same shapes: "
                   "`gpupack run` has no such limit"]
