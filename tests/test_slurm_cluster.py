"""gpupack.slurm against a real slurmctld: the local test cluster of slurm/testcluster/start.sh
(16 CPUs, 4 fake GPUs a node; the session starts it where none answers, see slurm_support.py).
Skipped with the reason where it cannot run, failed instead when GPUPACK_REQUIRE_SLURM=1."""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpupack import slurm, slurm_requeue, slurm_steps
from slurm_support import (  # noqa: F401 (fixtures)
    RECORD, Jobs, gpupack_status, jobs, python_script, slurm_env, submit_gpupack, wait_for, wait_for_file,
    wait_job_done,
)

pytestmark = pytest.mark.slurm

# Runs inside the job: one step per spec, built by srun_argv, all launched at once. Each step
# writes what it saw, then waits until every step has written: the job's steps only all exit 0
# if they ran at the same time, so a step that Slurm held back (GPUs taken by a CPU-only step,
# CPUs taken by a step without --exact) fails the test instead of slowing it.
STEPS_DRIVER = '''
import json, os, subprocess, sys
from pathlib import Path
from gpupack.slurm import Allocation
from gpupack.slurm_steps import srun_argv

out, mode, specs = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
alloc = Allocation.from_env(os.environ)
step = (
    'printf "%s|%s" "${CUDA_VISIBLE_DEVICES-unset}" "$SLURM_STEP_ID" > "$1/$2.tmp" && mv "$1/$2.tmp" "$1/$2.seen"; '
    'i=0; while [ "$(ls "$1" | grep -c "seen$")" -lt "$3" ]; do '
    'i=$((i+1)); [ $i -gt 600 ] && exit 7; sleep 0.05; done'
)
procs = {
    name: subprocess.Popen(srun_argv(
        name=name, node=alloc.nodes[0], gpu_indices=tuple(gpus), cpus=1, mode=mode,
        inner_argv=["sh", "-c", step, "sh", str(out), name, str(len(specs))],
        node_gpus=alloc.gpus_per_node,
    ))
    for name, gpus in specs.items()
}
codes = {name: p.wait() for name, p in procs.items()}
(out / "result.json").write_text(json.dumps({"codes": codes, "allocation": alloc.__dict__}))
'''

# Single GPUs in the reverse of Slurm's own lowest-free order, two 2-GPU sets and two CPU-only.
SPECS = {"g3": [3], "g2": [2], "g1": [1], "g0": [0], "g13": [1, 3], "g02": [0, 2], "cpu-a": [], "cpu-b": []}


@pytest.mark.parametrize("mode", slurm_steps.GPU_MODES)
def test_steps_see_the_gpus_gpupack_chose_and_run_concurrently(jobs: Jobs, tmp_path: Path, mode: str) -> None:
    script = python_script(tmp_path / "driver.py", STEPS_DRIVER)
    out = tmp_path / "out"
    out.mkdir()
    job = jobs.sbatch("--gres=gpu:4", "-c", "16", "-o", str(tmp_path / "job.log"),
                      str(script), str(out), mode, json.dumps(SPECS))
    result = json.loads(wait_for_file(out / "result.json", 90))
    assert result["allocation"]["gpu_ids"] == [0, 1, 2, 3] and result["allocation"]["job_id"] == job
    assert result["codes"] == {name: 0 for name in SPECS}, (tmp_path / "job.log").read_text()
    seen = {name: (out / f"{name}.seen").read_text().split("|") for name in SPECS}
    assert {name: cvd for name, (cvd, _) in seen.items()} == {
        name: ",".join(map(str, gpus)) if gpus else "unset" for name, gpus in SPECS.items()
    }
    assert len({step for _, step in seen.values()}) == len(SPECS)  # each its own job step


def test_end_time_of_a_real_job_and_a_changed_limit(jobs: Jobs, tmp_path: Path) -> None:
    job = jobs.sbatch("--time=5", "-o", str(tmp_path / "job.log"), "--wrap", "exec sleep 600")
    jobs.wait_state(job, {"RUNNING"}, 30)
    now = time.time()
    end = slurm.end_time(job, now)
    assert end is not None and 240 <= end - now <= 300

    # The scontrol fallback (EndTime, whole seconds) agrees with squeue's time left.
    def no_squeue(argv: Sequence[str]) -> str:
        if argv[0] == "squeue":
            raise slurm.SlurmFailed(argv, 1, "squeue: error: slurm_load_jobs: Socket timed out")
        return slurm.run_command(argv)

    fallback = slurm.end_time(job, now, run=no_squeue)
    assert fallback is not None and abs(fallback - end) <= 2

    clock = slurm.AllocationClock(job, refresh_s=0)
    left = clock.time_left_s(time.time())
    assert left is not None and 240 <= left <= 300
    subprocess.run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"], env=jobs.env, check=True)
    left = clock.time_left_s(time.time())
    assert left is not None and 540 <= left <= 600

    nolimit = jobs.sbatch("--time=UNLIMITED", "-o", str(tmp_path / "job2.log"), "--wrap", "exec sleep 600")
    jobs.wait_state(nolimit, {"RUNNING"}, 30)
    assert slurm.end_time(nolimit, time.time()) == math.inf  # squeue: UNLIMITED
    assert slurm.end_time(nolimit, time.time(), run=no_squeue) == math.inf  # scontrol: EndTime=Unknown
    assert slurm.AllocationClock(nolimit).time_left_s(time.time()) is None


# Records what each run of the job saw, then waits to be stopped (requeue sends it SIGTERM).
RUN_RECORDER = '''
import json, os, signal, sys
from pathlib import Path
from gpupack.slurm import Allocation

alloc = Allocation.from_env(os.environ)
out = Path(sys.argv[1])
record = {"restart_count": alloc.restart_count, "env": os.environ.get("SLURM_RESTART_COUNT"), "argv": sys.argv[1:]}
tmp = out / f"run-{os.environ['SLURM_JOB_ID']}-{alloc.restart_count}.tmp"
tmp.write_text(json.dumps(record))
tmp.rename(tmp.with_suffix(".json"))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
'''


def test_requeue_starts_the_job_again_with_restart_count_one(jobs: Jobs, tmp_path: Path) -> None:
    script = python_script(tmp_path / "recorder.py", RUN_RECORDER)
    job = jobs.sbatch("--requeue", "-o", str(tmp_path / "job.log"), "--open-mode=append", str(script), str(tmp_path))
    first = json.loads(wait_for_file(tmp_path / f"run-{job}-0.json", 30))
    assert first["restart_count"] == 0 and first["env"] is None  # unset on the first run
    assert slurm_requeue.requeue(job)
    # cred_expire=10 + sched_interval=5 on the test cluster: back within ~15 s.
    second = json.loads(wait_for_file(tmp_path / f"run-{job}-1.json", 60))
    assert second == {"restart_count": 1, "env": "1", "argv": [str(tmp_path)]}
    assert jobs.info(job).get("Restarts") == "1"


def test_resubmit_where_requeue_is_disabled(jobs: Jobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", jobs.env["PYTHONPATH"])  # resubmit() runs sbatch in our environment
    work = tmp_path / "work dir"
    work.mkdir()
    script = python_script(work / "recorder.py", RUN_RECORDER)
    args = [str(tmp_path), "two words", "--poll", "2"]
    job = jobs.sbatch("--no-requeue", "--time=7", "-o", str(tmp_path / "%j.log"), str(script), *args, cwd=work)
    wait_for_file(tmp_path / f"run-{job}-0.json", 30)
    assert not slurm_requeue.requeue(job)  # "Requested operation is presently disabled"
    found = slurm_requeue.job_script(job, args)
    assert found == str(script)
    new = slurm_requeue.resubmit(found, args, job_id=job)
    assert new is not None and new != job
    jobs.ids.append(new)
    record = json.loads(wait_for_file(tmp_path / f"run-{new}-0.json", 30))
    assert record["argv"] == args
    info = jobs.info(new)
    assert info["TimeLimit"] == "00:07:00" and info["WorkDir"] == str(work)  # sbatch options carried over


# --- end to end: sbatch slurm/parallel.slurm ---------------------------------------------------

PACKING = """\
name: packing
defaults: {{gpus: 1, mem: 50GB, time: 1m, cpus: 1}}
phases:
  - name: main
    experiments:
      - name: "short-{{i}}"
        cmd: 'echo "$SLURM_STEP_ID" > {{out}}/step-id && {record} 1'
        grid: {{i: [0, 1, 2, 3, 4, 5]}}
      - name: pair
        gpus: 2
        cmd: 'echo "$SLURM_STEP_ID" > {{out}}/step-id && {record} 1'
      - name: alone
        exclusive: true
        mem: 10GB
        cmd: 'echo "$SLURM_STEP_ID" > {{out}}/step-id && {record} 1'
      # Placed first (longest estimate); runs until every GPU experiment has finished. Had its
      # step taken the job's GPUs (a step without --gres=none does), none could finish.
      - name: cpu-only
        gpus: 0
        time: 1h
        cmd: >-
          echo "$SLURM_STEP_ID" > {{out}}/step-id && date +%s.%N > {{out}}/began &&
          for i in $(seq 1200); do [ $(ls {{run}}/exp/*/results.json 2>/dev/null | wc -l) -ge 8 ] && break; sleep 0.1; done &&
          {record} 0
"""


@pytest.mark.parametrize("mode", slurm_steps.GPU_MODES)
def test_sbatch_packs_experiments_as_steps_with_the_intended_gpus(jobs: Jobs, tmp_path: Path, mode: str) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(PACKING.format(record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, "--srun-mode", mode)
    log = tmp_path / f"gpupack-{job}.out"
    wait_job_done(jobs, job, log, 120)
    run_dir = tmp_path / "runs" / "packing"
    status = gpupack_status(jobs.env, run_dir)
    assert {n: e["state"] for n, e in status.items()} == {n: "succeeded" for n in status}, log.read_text()
    assert len(status) == 9
    # What it published for readers on other hosts names the Slurm job and says the run ended.
    published = json.loads((run_dir / "status.json").read_text())
    assert published["heartbeat"]["job_id"] == job and published["ended"]["exit_code"] == 0

    seen = {n: json.loads((run_dir / "exp" / n / "seen-1.json").read_text()) for n in status}
    for name, entry in status.items():
        gpus = entry["gpus"]
        assert seen[name]["cvd"] == (",".join(map(str, gpus)) if gpus else None), name
        assert entry["node"] == jobs.info(job)["NodeList"]
    assert len(status["pair"]["gpus"]) == 2 and status["cpu-only"]["gpus"] == []
    steps = {n: (run_dir / "exp" / n / "step-id").read_text().strip() for n in status}
    assert all(s.isdigit() for s in steps.values()) and len(set(steps.values())) == 9  # one job step each

    # Nothing shared the exclusive experiment's GPU while it ran.
    alone = seen["alone"]
    for name, s in seen.items():
        if name != "alone" and set(status[name]["gpus"]) & set(status["alone"]["gpus"]):
            assert s["end"] <= alone["start"] or s["start"] >= alone["end"], name
    # The CPU-only step was already running when the GPU experiments started and finished.
    began = float((run_dir / "exp" / "cpu-only" / "began").read_text())
    assert all(began < s["start"] for n, s in seen.items() if n != "cpu-only")


PREEMPT = """\
name: preempt
defaults: {{gpus: 1, mem: 10GB, cpus: 1}}
phases:
  - name: main
    experiments:
      - name: "quick-{{i}}"
        cmd: "{record} 0.2"
        grid: {{i: [0, 1]}}
      - name: long
        resumable: true
        cmd: "{record} 600 --resumed-seconds 0.5"
"""


def preempt_run(jobs: Jobs, tmp_path: Path, sbatch_args: tuple[str, ...], grace: str = "20") -> tuple[str, Path, Path]:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(PREEMPT.format(record=RECORD))
    job = submit_gpupack(jobs, tmp_path, manifest, "--grace", grace, sbatch_args=sbatch_args)
    return job, tmp_path / "runs" / "preempt", tmp_path / f"gpupack-{job}.out"


def assert_resumed_after_requeue(jobs: Jobs, job: str, run_dir: Path, log: Path) -> None:
    """Second run: finished experiments skipped, the interrupted one resumed, log appended."""
    info = wait_job_done(jobs, job, log, 120)
    assert info["Restarts"] == "1"
    status = gpupack_status(jobs.env, run_dir)
    assert {n: (e["state"], e["attempts"]) for n, e in status.items()} == {
        "quick-0": ("succeeded", 1), "quick-1": ("succeeded", 1), "long": ("succeeded", 2),
    }
    first = json.loads((run_dir / "exp" / "long" / "seen-1.json").read_text())
    second = json.loads((run_dir / "exp" / "long" / "seen-2.json").read_text())
    assert first["preempted"] and first["resume"] is None  # got the preempt signal through srun
    assert second["resume"] == "1" and not second["preempted"]
    text = log.read_text()
    run1, run2 = f"=== gpupack job {job} run 1 ", f"=== gpupack job {job} run 2 "
    assert run1 in text and run2 in text and text.index(run1) < text.index(run2), text  # appended
    assert "long started" in text[text.index(run2):]  # the second run launched only `long`
    assert "quick-0 started" not in text[text.index(run2):]


def test_usr1_interrupts_steps_requeues_and_the_second_run_resumes(jobs: Jobs, tmp_path: Path) -> None:
    job, run_dir, log = preempt_run(jobs, tmp_path, ())
    exp = run_dir / "exp"
    wait_for_file(exp / "long" / "started-1", 60)
    wait_for("the quick experiments to finish",
             lambda: all((exp / f"quick-{i}" / "results.json").exists() for i in (0, 1)), 60)
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=jobs.env, check=True)
    t_signal = time.time()
    second = json.loads(wait_for_file(exp / "long" / "started-2", 90))
    print(f"USR1 -> interrupted experiment running again in the requeued job: {second['start'] - t_signal:.1f}s")
    assert_resumed_after_requeue(jobs, job, run_dir, log)


def test_real_time_limit_signal_requeues_before_the_limit(jobs: Jobs, tmp_path: Path) -> None:
    # slurmctld looks every 30 s and signals once at most warn+30 s are left: with --time=1 and
    # @20 the warning comes 10-40 s after the start, late enough for gpupack to have its
    # handlers, early enough for grace and requeue before the limit.
    job, run_dir, log = preempt_run(jobs, tmp_path, ("--time=1", "--signal=B:USR1@20"))
    wait_for_file(run_dir / "exp" / "long" / "started-2", 120)
    assert_resumed_after_requeue(jobs, job, run_dir, log)
    assert "allocation ending (USR1)" in log.read_text()


def test_scancel_stops_the_run_for_good_it_does_not_requeue_itself(jobs: Jobs, tmp_path: Path) -> None:
    # --grace 1: the run reaches its end-of-allocation decision within the cluster's KillWait (5 s).
    job, run_dir, log = preempt_run(jobs, tmp_path, (), grace="1")
    wait_for_file(run_dir / "exp" / "long" / "started-1", 60)
    subprocess.run(["scancel", job], env=jobs.env, check=True)
    info = jobs.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 60)
    text = log.read_text()
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), text
    assert f"not requeued: job {job} was cancelled (scancel)" in text
    assert gpupack_status(jobs.env, run_dir)["long"]["state"] == "interrupted"  # a new submission resumes it




def test_a_preempted_job_interrupts_its_experiments_requeues_and_resumes_them(jobs: Jobs, tmp_path: Path) -> None:
    # The test cluster's partition "urgent" preempts "debug" with GraceTime (start.sh): Slurm
    # kills the job's steps at once, but signals the batch step (gpupack) only when the grace is
    # over. gpupack learns it from its killed steps (PreemptTime), stops and requeues the job.
    job, run_dir, log = preempt_run(jobs, tmp_path, ())
    exp = run_dir / "exp"
    wait_for_file(exp / "long" / "started-1", 60)
    wait_for("the quick experiments to finish",
             lambda: all((exp / f"quick-{i}" / "results.json").exists() for i in (0, 1)), 60)
    node = jobs.info(job)["NodeList"]
    urgent = jobs.sbatch("-p", "urgent", "-w", node, "--gres=gpu:4", "-o", str(tmp_path / "urgent.log"),
                         "--wrap", "exec sleep 2")
    t_preempt = time.time()
    second = json.loads(wait_for_file(exp / "long" / "started-2", 120))
    print(f"preempted -> interrupted experiment running again in the requeued job: {second['start'] - t_preempt:.1f}s")
    assert jobs.info(urgent).get("JobState") in ("RUNNING", "COMPLETING", "COMPLETED")
    info = wait_job_done(jobs, job, log, 120)
    assert info["Restarts"] == "1"
    status = gpupack_status(jobs.env, run_dir)
    assert {n: (e["state"], e["attempts"]) for n, e in status.items()} == {
        "quick-0": ("succeeded", 1), "quick-1": ("succeeded", 1), "long": ("succeeded", 2),
    }
    assert second["resume"] == "1"
    text = log.read_text()
    assert "stopping: allocation ending (preempted)" in text, text
    assert "long interrupted after" in text and "Slurm is ending the job (preempted)" in text, text
    assert f"requeued job {job} (run 2)" in text, text

# A batch script that outlives its SIGTERM: it starts one step, waits for it to end, then asks
# slurm.job_ending() what the step's end meant.
STEP_END_WATCHER = '''
import json, os, signal, subprocess, sys
from pathlib import Path
from gpupack.slurm import job_ending

signal.signal(signal.SIGTERM, lambda *_: None)  # a handler, not SIG_IGN, which srun would inherit
out, job = Path(sys.argv[1]), os.environ["SLURM_JOB_ID"]
before = job_ending(job)
step = subprocess.Popen(["srun", "-n1", "sh", "-c", f"echo up > {out}/started; exec sleep 600"])
code = step.wait()
(out / "seen.tmp").write_text(json.dumps({"before": before, "code": code, "after": job_ending(job)}))
(out / "seen.tmp").rename(out / "seen.json")
'''


def test_a_step_killed_by_scancel_finds_its_job_ending(jobs: Jobs, tmp_path: Path) -> None:
    # What SrunLauncher.lost relies on: slurmctld marks the job before it signals the steps, so
    # a step that died of the cancel (before gpupack heard its own signal) is told from a failure.
    script = python_script(tmp_path / "watcher.py", STEP_END_WATCHER)
    job = jobs.sbatch("-o", str(tmp_path / "job.log"), str(script), str(tmp_path))
    wait_for_file(tmp_path / "started", 60)
    subprocess.run(["scancel", job], env=jobs.env, check=True)
    seen = json.loads(wait_for_file(tmp_path / "seen.json", 30))
    assert seen["before"] is None and seen["code"] != 0, seen
    assert seen["after"] in ("COMPLETING", "CANCELLED"), seen

TRAINERS = """\
name: trainers
defaults: {{gpus: 1, mem: 10GB, cpus: 1, resumable: true}}
phases:
  - name: main
    experiments:
      - name: trainer
        cmd: "{python} {root}/tests/bin/trainer.py 3000"
"""


def test_preempted_trainer_in_a_step_checkpoints_with_its_workers_alive(jobs: Jobs, tmp_path: Path) -> None:
    """The step's own processes: only the trainer gets the preempt signal, even where Slurm's
    proctrack plugin (linuxproc here) would signal every process of the step."""
    import sys

    from slurm_support import ROOT

    manifest = tmp_path / "m.yaml"
    manifest.write_text(TRAINERS.format(python=sys.executable, root=ROOT))
    job = submit_gpupack(jobs, tmp_path, manifest, "--grace", "20")
    run_dir, log = tmp_path / "runs" / "trainers", tmp_path / f"gpupack-{job}.out"
    wait_for_file(run_dir / "exp" / "trainer" / "started-1", 60)
    subprocess.run(["scancel", "-b", "-s", "USR1", job], env=jobs.env, check=True)
    info = wait_job_done(jobs, job, log, 120)
    assert info["Restarts"] == "1"
    ckpt = json.loads((run_dir / "exp" / "trainer" / "checkpoint.json").read_text())
    assert ckpt["workers_alive"] == 4 and ckpt["step"] > 0, log.read_text()
    results = json.loads((run_dir / "exp" / "trainer" / "results.json").read_text())
    assert results == {"steps": 3000, "resumed_from": ckpt["step"]}
    assert gpupack_status(jobs.env, run_dir)["trainer"]["attempts"] == 2
