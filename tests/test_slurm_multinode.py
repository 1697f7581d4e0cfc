"""Several nodes, one pool of GPUs, on the real two-node test cluster
(`slurm/testcluster/start.sh --nodes 2`: nodes n1 and n2, 4 fake GPUs each): `sbatch --nodes=2
slurm/parallel.slurm` packs experiments on both nodes, a node set down mid-run costs only
interrupted attempts that resume on the other node, and a requeued two-node job skips what
finished. Skipped on a one-node cluster, failed instead when GPUPACK_REQUIRE_SLURM=1 (CI)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from slurm_support import (  # noqa: F401 (fixtures)
    RECORD, ROOT, Jobs, gpupack_status, jobs, slurm_env, submit_gpupack, two_nodes, wait_for, wait_for_file,
    wait_job_done,
)

pytestmark = pytest.mark.slurm
TWO_NODES = ("--nodes=2",)


def seen(run_dir: Path, name: str, attempt: int = 1) -> dict[str, Any]:
    return json.loads((run_dir / "exp" / name / f"seen-{attempt}.json").read_text())


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


# --- packing on both nodes (the bar) ---------------------------------------------------

BAR = """\
name: bar
defaults: {{gpus: 1, mem: 60GB, time: {seconds}s, cpus: 1}}
phases:
  - name: main
    experiments:
      - name: "e{{i}}"
        cmd: "{record} {seconds}"
        grid: {{i: [{grid}]}}
"""


def test_two_node_job_packs_experiments_on_both_nodes(jobs: Jobs, tmp_path: Path, two_nodes: list[str]) -> None:
    # 16 experiments of 60 GB on 2 x 4 x 80 GB: one per GPU, two waves of 8.
    manifest = tmp_path / "m.yaml"
    manifest.write_text(BAR.format(record=RECORD, grid=", ".join(map(str, range(16))), seconds=5))
    job = submit_gpupack(jobs, tmp_path, manifest, sbatch_args=TWO_NODES)
    log = tmp_path / f"gpupack-{job}.out"
    wait_job_done(jobs, job, log, 180)
    run_dir = tmp_path / "runs" / "bar"
    status = gpupack_status(jobs.env, run_dir)
    assert {e["state"] for e in status.values()} == {"succeeded"} and len(status) == 16, log.read_text()
    records = {n: seen(run_dir, n) for n in status}
    for name, e in status.items():
        assert e["node"] == records[name]["node"], name  # status --json says where it really ran
        assert records[name]["cvd"] == str(e["gpus"][0])
    per_node = {n: sum(1 for e in status.values() if e["node"] == n) for n in two_nodes}
    assert per_node == {two_nodes[0]: 8, two_nodes[1]: 8}, per_node
    # Never two on one GPU (60 + 60 GB > 80 GB), and both nodes' GPUs all busy at once.
    for key in {(e["node"], e["gpus"][0]) for e in status.values()}:
        on_gpu = [(records[n]["start"], records[n]["end"]) for n, e in status.items() if (e["node"], e["gpus"][0]) == key]
        assert most_at_once(on_gpu) == 1, key
    spans = [(r["start"], r["end"]) for r in records.values()]
    assert most_at_once(spans) == 8
    makespan = max(e["ended_at"] for e in status.values()) - min(e["started_at"] for e in status.values())
    print(f"16 x (1 GPU, 60 GB, 5 s) on 2 nodes x 4 GPUs: makespan {makespan:.1f} s (ideal 10 s, bar 13 s)")
    assert "not heard from" not in log.read_text()  # the reader on the other node kept up


@pytest.mark.parametrize("mode", ["gres-none", "overlap"])
def test_nodes_holding_different_gpus_are_read_not_assumed(
    jobs: Jobs, tmp_path: Path, two_nodes: list[str], mode: str
) -> None:
    # `--gpus=6` over two 4-GPU nodes: Slurm gives the job 4 GPUs on one node and 2 on the other.
    # (sbatch refuses --gpus=6 beside the script's `--gres=gpu:4`, "not multiple of --gres=gpu".)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(BAR.format(record=RECORD, grid=", ".join(map(str, range(12))), seconds=2))
    script = tmp_path / "parallel.slurm"
    script.write_text("".join(line for line in (ROOT / "slurm" / "parallel.slurm").read_text().splitlines(True)
                              if not line.startswith("#SBATCH --gres")))
    job = jobs.sbatch("--nodes=2", "--gpus=6", str(script), str(manifest), "--gpus", "4x80GB", "--poll", "1",
                      "--srun-mode", mode, cwd=tmp_path)
    log = tmp_path / f"gpupack-{job}.out"
    wait_job_done(jobs, job, log, 180)
    run_dir = tmp_path / "runs" / "bar"
    status = gpupack_status(jobs.env, run_dir)
    assert {e["state"] for e in status.values()} == {"succeeded"} and len(status) == 12, log.read_text()
    held = {two_nodes[0]: {0, 1, 2, 3}, two_nodes[1]: {0, 1}}  # what `scontrol show job -d` says
    used = {n: {e["gpus"][0] for e in status.values() if e["node"] == n} for n in two_nodes}
    assert used == held, used
    assert "12 experiments on 6 GPUs" in log.read_text()
    assert most_at_once([(seen(run_dir, n)["start"], seen(run_dir, n)["end"]) for n in status]) == 6


# --- a node lost mid-run --------------------------------------------------------------------

# Eight experiments, one per GPU of both nodes. A first attempt waits for the test's `release`
# file; a resumed one (GPUPACK_RESUME=1) finishes at once.
LOST = """\
name: lost
defaults: {{gpus: 1, mem: 60GB, time: 1m, cpus: 1, retries: 0}}
phases:
  - name: main
    experiments:
      - name: "w{{i}}"
        resumable: true
        cmd: >-
          echo "$SLURMD_NODENAME" > {{out}}/node-$GPUPACK_ATTEMPT;
          if [ -z "$GPUPACK_RESUME" ]; then for i in $(seq 1800); do [ -e {{run}}/release ] && break; sleep 0.1; done; fi;
          {record} 0.2
        grid: {{i: [0, 1, 2, 3, 4, 5, 6, 7]}}
"""


@pytest.fixture
def node_back(slurm_env: dict[str, str]) -> Any:
    """Whatever a test did to a node, it takes jobs again afterwards."""
    downed: list[str] = []
    yield downed
    for node in downed:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=slurm_env,
                       capture_output=True, timeout=30)  # "Invalid node state" when already back


def test_a_node_lost_mid_run_costs_only_interrupted_attempts(
    jobs: Jobs, tmp_path: Path, two_nodes: list[str], node_back: list[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(LOST.format(record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, sbatch_args=TWO_NODES)
    log = tmp_path / f"gpupack-{job}.out"
    run_dir = tmp_path / "runs" / "lost"
    names = [f"w{i}" for i in range(8)]
    marks = {n: run_dir / "exp" / n / "node-1" for n in names}
    wait_for("all 8 experiments to run", lambda: all(m.exists() and m.read_text().strip() for m in marks.values()), 90)
    first = {n: m.read_text().strip() for n, m in marks.items()}
    batch, other = jobs.info(job)["BatchHost"], next(n for n in two_nodes if n != jobs.info(job)["BatchHost"])
    on_other = sorted(n for n, node in first.items() if node == other)
    assert len(on_other) == 4, first

    node_back.append(other)
    subprocess.run(["scontrol", "update", f"nodename={other}", "state=down", "reason=test"], env=jobs.env, check=True)
    wait_for(f"the experiments on {other} to be recorded interrupted",
             lambda: all(gpupack_status(jobs.env, run_dir)[n]["state"] == "interrupted" for n in on_other), 60)
    status = gpupack_status(jobs.env, run_dir)
    assert all(status[n]["state"] == "running" for n in names if n not in on_other)  # the rest goes on
    (run_dir / "release").write_text("")

    wait_job_done(jobs, job, log, 120)
    status = gpupack_status(jobs.env, run_dir)
    text = log.read_text()
    for n in names:
        assert status[n]["state"] == "succeeded", (n, text)
        if n in on_other:  # resumed on the node that is left, without using a retry (retries: 0)
            again = seen(run_dir, n, 2)
            assert status[n]["attempts"] == 2 and status[n]["node"] == batch and again["node"] == batch, n
            assert again["resume"] == "1"
            assert f"{n} interrupted after" in text and f"node {other} left the allocation" in text
        else:
            assert status[n]["attempts"] == 1, n
    assert text.count(f"{other}:gpu0,gpu1,gpu2,gpu3 unavailable: left the allocation (") == 1  # one event for the node


# --- requeue of a two-node job ---------------------------------------------------------------

REQUEUE = """\
name: requeue
defaults: {{gpus: 1, mem: 60GB, cpus: 1}}
phases:
  - name: main
    experiments:
      - name: "quick-{{i}}"
        cmd: "{record} 0.2"
        grid: {{i: [0, 1, 2, 3, 4, 5]}}
      - name: "long-{{i}}"
        resumable: true
        time: 1h
        cmd: "{record} 600 --resumed-seconds 0.5"
        grid: {{i: [0, 1]}}
"""


def test_requeued_two_node_job_skips_what_finished(jobs: Jobs, tmp_path: Path, two_nodes: list[str]) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(REQUEUE.format(record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, "--grace", "20", sbatch_args=TWO_NODES)
    log = tmp_path / f"gpupack-{job}.out"
    run_dir = tmp_path / "runs" / "requeue"
    exp = run_dir / "exp"
    wait_for("the long experiments to start and the quick ones to finish", lambda: all(
        (exp / f"long-{i}" / "started-1").exists() for i in (0, 1)) and all(
        (exp / f"quick-{i}" / "results.json").exists() for i in range(6)), 90)
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=jobs.env, check=True)
    for i in (0, 1):
        wait_for_file(exp / f"long-{i}" / "started-2", 90)
    info = wait_job_done(jobs, job, log, 120)
    assert info["Restarts"] == "1"
    status = gpupack_status(jobs.env, run_dir)
    assert {n: (e["state"], e["attempts"]) for n, e in status.items()} == {
        **{f"quick-{i}": ("succeeded", 1) for i in range(6)}, **{f"long-{i}": ("succeeded", 2) for i in (0, 1)},
    }
    for i in (0, 1):
        assert seen(run_dir, f"long-{i}", 1)["preempted"] and seen(run_dir, f"long-{i}", 2)["resume"] == "1"
    text = log.read_text()
    run2 = text.index(f"=== gpupack job {job} run 2 ")
    assert "6 already succeeded (skipped)" in text[run2:] and "quick-0 started" not in text[run2:]
    assert {e["node"] for e in status.values()} == set(two_nodes)  # the first run used both nodes



# --- one experiment on both nodes -------------------------------------------------------------

GLOO = """\
name: gloo
phases:
  - name: main
    experiments:
      - name: pair
        nodes: 2
        gpus: 4
        mem: 10GB
        time: 1m
        cmd: "python3 {script}"
      - name: "single-{{i}}"
        gpus: 1
        mem: 10GB
        cmd: "{record} 0.2"
        grid: {{i: [0, 1]}}
"""


def test_a_two_node_experiment_exchanges_a_value_through_gloo(jobs: Jobs, tmp_path: Path, two_nodes: list[str]) -> None:
    pytest.importorskip("torch")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(GLOO.format(script=Path(__file__).parent / "bin" / "allreduce.py", record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, sbatch_args=TWO_NODES)
    log = tmp_path / f"gpupack-{job}.out"
    wait_job_done(jobs, job, log, 240)
    run_dir = tmp_path / "runs" / "gloo"
    status = gpupack_status(jobs.env, run_dir)
    assert {e["state"] for e in status.values()} == {"succeeded"}, log.read_text()
    ranks = [json.loads((run_dir / "exp" / "pair" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [30.0, 30.0] and [r["world"] for r in ranks] == [2, 2]
    nodes = status["pair"]["node"].split(",")
    assert sorted(nodes) == sorted(two_nodes)
    for r, seen_ in enumerate(ranks):
        assert seen_["SLURMD_NODENAME"] == nodes[r]  # rank r on the r-th node of the placement
        assert seen_["RANK"] == seen_["NODE_RANK"] == seen_["GPUPACK_NODE_RANK"] == str(r)
        assert seen_["WORLD_SIZE"] == seen_["GPUPACK_NNODES"] == "2" and seen_["GPUPACK_NODES"] == ",".join(nodes)
        assert seen_["MASTER_ADDR"] == "127.0.0.1"  # the first node's NodeAddr on the test cluster
        assert seen_["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


# --- the readers: silent, restarted ---------------------------------------------------------

HOLD = """\
name: hold
phases:
  - name: main
    experiments:
      - name: hold
        gpus: 1
        mem: 10GB
        cmd: "for i in $(seq 1800); do [ -e {{run}}/release ] && break; sleep 0.1; done; {record} 0"
"""


def reader_pids(run_dir: Path) -> list[int]:
    """The reader processes of this run (the test cluster's nodes all live on this machine)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"gpupack._reader"] and str(run_dir).encode() in argv:  # not its srun
            pids.append(int(entry.name))
    return pids


def test_a_silent_reader_makes_its_node_unavailable_and_a_dead_one_is_restarted(
    jobs: Jobs, tmp_path: Path, two_nodes: list[str]
) -> None:
    import os
    import signal

    jobs.env = {**jobs.env, "GPUPACK_READER_STALE_S": "3"}  # at least 3 x --poll 1
    manifest = tmp_path / "m.yaml"
    manifest.write_text(HOLD.format(record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, sbatch_args=TWO_NODES)
    log = tmp_path / f"gpupack-{job}.out"
    run_dir = tmp_path / "runs" / "hold"
    wait_for_file(log, 60, contains="on 8 GPUs of 2 nodes")  # every reader has answered
    pid = wait_for("the reader of the other node", lambda: (lambda p: p[0] if len(p) == 1 else None)(reader_pids(run_dir)), 60)
    other = next(n for n in two_nodes if n != jobs.info(job)["BatchHost"])
    os.kill(pid, signal.SIGSTOP)  # alive but silent
    try:
        wait_for_file(log, 60, contains=f"{other}:gpu0,gpu1,gpu2,gpu3 unavailable: not heard from for over 3s")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_file(log, 60, contains=f"{other}:gpu0,gpu1,gpu2,gpu3 available again")
    os.kill(pid, signal.SIGKILL)
    again = wait_for("the reader to be started again", lambda: (lambda p: p[0] if p and p[0] != pid else None)(reader_pids(run_dir)), 60)
    assert again != pid
    (run_dir / "release").write_text("")
    wait_job_done(jobs, job, log, 60)
    assert gpupack_status(jobs.env, run_dir)["hold"]["state"] == "succeeded"
    assert reader_pids(run_dir) == []  # stopped with the run
