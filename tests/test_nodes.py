"""Simulated nodes end to end (README "What an experiment sees"): `--gpus 2x4x80GB` is two nodes
of 4 GPUs; a `nodes: 2` experiment runs its two ranks side by side on this machine, and they
really meet through torch.distributed; one-node experiments pack on both nodes."""

from __future__ import annotations

import json
import signal

import pytest

from conftest import ROOT, RECORD, by_name, gpupack, gpupack_env, max_overlap, seen, start_gpupack, wait_for

ENV = gpupack_env(GPUPACK_GPUS="2x4x80GB")


def test_two_ranks_meet_through_gloo_and_small_ones_pack_on_both_nodes(write_manifest, tmp_path):
    pytest.importorskip("torch")
    m = write_manifest(f"""
        name: nodes
        phases:
          - name: small
            experiments:
              - name: "s{{i}}"
                cmd: {RECORD} 1
                grid: {{i: [1, 2, 3, 4, 5, 6, 7, 8]}}
                mem: 60GB
                time: 1s
          - name: ddp
            experiments:
              - name: pair
                cmd: python3 {ROOT}/tests/bin/ddp_pair.py
                nodes: 2
                mem: 10GB
                time: 30s
        """)
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "nodes"
    rows = by_name(run_dir)
    # status --json: the nodes of a multi-node attempt in rank order, its GPUs on each.
    assert (rows["pair"]["node"], rows["pair"]["gpus"]) == ("n1,n2", [0, 1, 2, 3])
    ranks = [json.loads((run_dir / "exp" / "pair" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [3.0, 3.0]  # 1 + 2, all-reduced across the two ranks
    for r, saw in enumerate(ranks):
        assert saw | {"MASTER_PORT": None} == {
            "RANK": str(r), "NODE_RANK": str(r), "GPUPACK_NODE_RANK": str(r), "WORLD_SIZE": "2",
            "GPUPACK_NNODES": "2", "GPUPACK_NODES": "n1,n2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None,
            "CUDA_VISIBLE_DEVICES": "0,1,2,3", "sum": 3.0,
        }
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"] and int(ranks[0]["MASTER_PORT"]) > 0
    # 8 x 60 GB on 8 GPUs, one per GPU: both nodes at once, each small one where status says.
    nodes = {rows[f"s{i}"]["node"] for i in range(1, 9)}
    assert nodes == {"n1", "n2"}
    spans = [(seen(run_dir, f"s{i}")["start"], seen(run_dir, f"s{i}")["end"]) for i in range(1, 9)]
    assert max_overlap(spans) > 4


def test_a_failing_rank_ends_the_attempt_with_its_status_and_stops_the_other(write_manifest, tmp_path):
    # Rank 1 exits 3 at once; rank 0 would sleep 60 s: it is stopped, and the attempt fails with 3.
    m = write_manifest("""
        name: rankfail
        phases:
          - name: p
            experiments:
              - name: pair
                cmd: 'if [ "$RANK" = 1 ]; then exit 3; fi; sleep 60'
                nodes: 2
        """)
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV, timeout=40)
    assert done.returncode == 1, done.stdout + done.stderr
    row = by_name(tmp_path / "runs" / "rankfail")["pair"]
    assert (row["state"], row["exit_code"], row["node"]) == ("failed", 3, "n1,n2")
    assert row["ended_at"] - row["started_at"] < 30


def test_dashboard_groups_gpu_rows_by_node_and_status_shows_the_nodes(write_manifest, tmp_path):
    from gpupack import dashboard
    from gpupack.store import UNAVAILABLE_META, Store

    m = write_manifest("""
        name: board
        phases:
          - name: p
            experiments:
              - {name: pair, cmd: "true", nodes: 2, mem: 10GB}
              - {name: one, cmd: "true", mem: 10GB}
        """)
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=gpupack_env(GPUPACK_GPUS="2x2x80GB"))
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "board"
    store = Store(run_dir / "state.db")
    now = store.runs()[-1]["started_at"] + 1
    # As if both ran again now: pair on the two nodes whole, one on n2's gpu1.
    store.begin_attempt("pair", 2, None, "n1,n2", (0, 1), "log", 10**10, now)
    store.begin_attempt("one", 2, None, "n2", (1,), "log", 10**10, now)
    lost = "node lost (test)"
    store.set_meta({UNAVAILABLE_META: json.dumps({"n2:0": lost, "n2:1": lost})})
    text = dashboard.plain_snapshot(dashboard.build_view(store, now))
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith(("node ", "  gpu"))]
    assert [r.split("|")[0].rstrip() for r in rows] == ["node n1", "  gpu0", "  gpu1", "node n2", "  gpu0", "  gpu1"]
    assert rows[0].endswith("| 2 of 2 GPUs busy") and rows[3].endswith(f"| 2 of 2 GPUs busy; node unavailable: {lost}")
    assert all(r.endswith("| pair (-/10.0 GB)") for r in rows[1:3])
    assert all(r.endswith(f"| UNAVAILABLE: {lost}") for r in rows[4:])  # its occupants on the lines below
    # n2's gpu1 holds both: the second occupant on the line below it
    last = max(i for i, line in enumerate(lines) if line.startswith("  gpu1"))
    assert [line.split("|")[-1].strip() for line in lines[last + 1 : last + 3]] == ["pair (-/10.0 GB)", "one (-/10.0 GB)"]
    store.close()
    table = gpupack("status", str(run_dir), env=gpupack_env(COLUMNS="120"))
    line = next(x for x in table.stdout.splitlines() if x.strip().startswith("pair"))
    assert line.split()[4:6] == ["n1,n2", "gpu0,gpu1"]


def test_preempting_a_multi_node_experiment_signals_every_rank_and_it_resumes(write_manifest, tmp_path):
    # The preempt signal goes to the command (ranks.py here), which passes it on to both ranks;
    # they record it, the attempt is interrupted, and the next run resumes it (GPUPACK_RESUME=1).
    ledger = tmp_path / "ledger"
    m = write_manifest(f"""
        name: preempt
        phases:
          - name: p
            experiments:
              - name: pair
                cmd: bash {ROOT}/tests/bin/ledger.sh {ledger} pair-$RANK 30
                nodes: 2
                resumable: true
        """)
    proc = start_gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV)
    try:
        wait_for(lambda: ledger.exists() and ledger.read_text().count("start ") == 2, what="both ranks started")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 3, out
    lines = sorted(line.split()[:4] for line in ledger.read_text().splitlines())
    assert lines == [["preempted", f"pair-{r}", "1", "resume=0"] for r in (0, 1)] + [
        ["start", f"pair-{r}", "1", "resume=0"] for r in (0, 1)
    ]
    assert by_name(tmp_path / "runs" / "preempt")["pair"]["state"] == "interrupted"
    m.write_text(m.read_text().replace(" 30\n", " 0.1\n"))
    done = gpupack("run", str(m), "--poll", "1", "--no-report", env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    ends = sorted(line.split()[:4] for line in ledger.read_text().splitlines() if line.startswith("end"))
    assert ends == [["end", f"pair-{r}", "2", "resume=1"] for r in (0, 1)]


def test_run_refuses_whole_nodes_the_allocation_cannot_give_in_one_line_each(write_manifest):
    m = write_manifest("""
        name: refused
        phases:
          - name: p
            experiments:
              - {name: three, cmd: "true", nodes: 3}
              - {name: halves, cmd: "true", nodes: 2, gpus: 2}
              - {name: zero, cmd: "true", nodes: 0}
        """)
    done = gpupack("run", str(m), "--no-report", env=ENV)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"gpupack: error: {m}: zero: nodes: must be >= 1, got 0"]
    m.write_text(m.read_text().replace("nodes: 0", "nodes: 1"))
    done = gpupack("run", str(m), "--no-report", env=ENV)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gpupack: error: {m}: three: nodes: needs 3 whole nodes of 4 GPUs; the allocation has 2",
        f"gpupack: error: {m}: halves: gpus: nodes: 2 takes whole nodes: gpus must be 4, the GPUs of a node (or left out)",
    ]


def test_a_lost_node_is_one_event_and_so_is_its_return(tmp_path):
    from dataclasses import replace

    from gpupack.engine import Engine, RunOptions
    from gpupack.gpus import SimulatedProbe, parse_gpu_spec
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load_text
    from gpupack.store import Store

    manifest = load_text("name: lost\nphases: [{name: p, experiments: [{name: e, cmd: 'true'}]}]\n", tmp_path / "m.yaml")
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    probe = SimulatedProbe(parse_gpu_spec("2x4x80GB", "node"))
    engine = Engine(manifest, store, probe, LocalLauncher(), probe.inventory(), RunOptions())
    engine.prepare()
    reading = probe.read({})
    why = "left the allocation (test)"
    lost = replace(reading, gpus=tuple(replace(g, unavailable=why) if g.node == "n2" else g for g in reading.gpus))
    flaky = replace(reading, gpus=tuple(replace(g, unavailable="readings failing") if g.key == ("n1", 1) else g for g in reading.gpus))
    for r in (lost, reading, flaky):
        engine._note_unavailable(r)
    said = [e.message for e in store.events() if "available" in e.message]
    assert said == [
        f"n2:gpu0,gpu1,gpu2,gpu3 unavailable: {why}; no new experiments there",
        "n2:gpu0,gpu1,gpu2,gpu3 available again",
        "n1:gpu1 unavailable: readings failing; no new experiments there",
    ]
    engine.close(0)
    store.close()
