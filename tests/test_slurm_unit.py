"""gpupack.slurm without a cluster: generated srun commands (golden), allocation facts from real
job environments (captured on Slurm 22.05), time parsing, requeue plumbing with a fake runner,
and the step throttle. The same code runs against a real slurmctld in test_slurm_cluster.py."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpupack import slurm, slurm_requeue, slurm_steps
from gpupack.slurm import Allocation, AllocationClock
from gpupack.slurm_steps import StepThrottle, srun_argv

INNER = ["bash", "-c", "python train.py --out /runs/x"]
COMMON = [
    "srun", "--exact", "-N1", "-n1", "--nodelist=gpu07", "--job-name=bridge-s42",
    "--cpus-per-task=4", "--mem=0", "--kill-on-bad-exit=1", "--export=ALL",
]


class FakeSlurm:
    """Answers commands from a table {argv prefix: stdout or None (= exited non-zero)}; records calls."""

    def __init__(self, answers: dict[tuple[str, ...], str | None]):
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        for prefix, out in self.answers.items():
            if tuple(argv[: len(prefix)]) == prefix:
                if out is None:
                    raise slurm.SlurmFailed(argv, 1, "slurm_fake: failed")
                return out
        raise AssertionError(f"unexpected command {list(argv)}")


# --- srun_argv: golden ---------------------------------------------------------------------


def argv_for(mode: str, gpus: tuple[int, ...], node_gpus: int | None = 4) -> list[str]:
    return srun_argv(
        name="bridge-s42", node="gpu07", gpu_indices=gpus, cpus=4, mode=mode,  # type: ignore[arg-type]
        inner_argv=INNER, node_gpus=node_gpus,
    )


@pytest.mark.parametrize(
    ("mode", "gpus", "tail"),
    [
        # CPU-only: no GPU option would mean "all of the job's GPUs" and block; CVD is removed.
        ("gres-none", (), ["--gres=none", "env", "-u", "CUDA_VISIBLE_DEVICES", *INNER]),
        ("gres-none", (2,), ["--gres=none", "env", "CUDA_VISIBLE_DEVICES=2", *INNER]),
        ("gres-none", (1, 3), ["--gres=none", "env", "CUDA_VISIBLE_DEVICES=1,3", *INNER]),
        ("overlap", (), ["--gres=none", "env", "-u", "CUDA_VISIBLE_DEVICES", *INNER]),
        ("overlap", (2,), ["--overlap", "--gpus=4", "env", "CUDA_VISIBLE_DEVICES=2", *INNER]),
        ("overlap", (1, 3), ["--overlap", "--gpus=4", "env", "CUDA_VISIBLE_DEVICES=1,3", *INNER]),
    ],
)
def test_srun_argv_golden(mode: str, gpus: tuple[int, ...], tail: list[str]) -> None:
    assert argv_for(mode, gpus) == COMMON + tail


def test_srun_argv_overlap_without_node_gpus_takes_slurm_default() -> None:
    assert argv_for("overlap", (0,), node_gpus=None)[len(COMMON):] == [
        "--overlap", "env", "CUDA_VISIBLE_DEVICES=0", *INNER,
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "shards"}, "unknown GPU mode 'shards'"),
        ({"cpus": 0}, "cpus must be >= 1"),
        ({"inner_argv": []}, "must start with a command"),
        ({"inner_argv": ["A=1", "python"]}, "must start with a command"),  # env would take it as a variable
    ],
)
def test_srun_argv_refuses(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(
        name="x", node="n", gpu_indices=(0,), cpus=1, mode="gres-none", inner_argv=["true"]
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        srun_argv(**args)  # type: ignore[arg-type]


# --- GPU mode ----------------------------------------------------------------------------------

CONFIG_NO_CGROUP = "TaskPlugin              = task/none\nTCPTimeout              = 2 sec\n"
CONFIG_CGROUP = (
    "TaskPlugin              = task/affinity,task/cgroup\n\n"
    "Cgroup Support Configuration:\nConstrainCores          = yes\nConstrainDevices        = {}\n"
)


@pytest.mark.parametrize(
    ("config", "override", "mode"),
    [
        (CONFIG_NO_CGROUP, None, "gres-none"),  # nothing can constrain devices
        (CONFIG_CGROUP.format("yes"), None, "overlap"),
        (CONFIG_CGROUP.format("no"), None, "gres-none"),
        ("TaskPlugin = task/cgroup\n", None, "overlap"),  # cgroup.conf not shown: assume constrained
        (None, None, "overlap"),  # scontrol failed: the mode that works everywhere
        (None, "auto", "overlap"),
        (CONFIG_CGROUP.format("yes"), "gres-none", "gres-none"),
    ],
)
def test_gpu_mode(config: str | None, override: str | None, mode: str) -> None:
    assert slurm_steps.gpu_mode(config, override) == mode


def test_gpu_mode_refuses_unknown_override() -> None:
    with pytest.raises(ValueError, match="'shard' is not one of auto, gres-none, overlap"):
        slurm_steps.gpu_mode(None, "shard")


def test_detect_gpu_mode_asks_scontrol_only_without_override() -> None:
    fake = FakeSlurm({("scontrol", "show", "config"): CONFIG_NO_CGROUP})
    assert slurm_steps.detect_gpu_mode(None, run=fake) == "gres-none"
    assert slurm_steps.detect_gpu_mode("overlap", run=fake) == "overlap"
    assert len(fake.calls) == 1


# --- Allocation.from_env -------------------------------------------------------------------

# `sbatch --gres=gpu:4 -c 16` on the test cluster (Slurm 22.05), batch step environment.
ENV_ONE_NODE = {
    "CUDA_VISIBLE_DEVICES": "0,1,2,3", "GPU_DEVICE_ORDINAL": "0,1,2,3", "SLURMD_NODENAME": "vm",
    "SLURM_CPUS_ON_NODE": "16", "SLURM_CPUS_PER_TASK": "16", "SLURM_GPUS_ON_NODE": "4",
    "SLURM_JOBID": "1", "SLURM_JOB_CPUS_PER_NODE": "16", "SLURM_JOB_GPUS": "0,1,2,3",
    "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_JOB_NUM_NODES": "1",
    "SLURM_NNODES": "1", "SLURM_NODELIST": "vm", "SLURM_TASKS_PER_NODE": "1",
}


def no_commands(argv: Sequence[str]) -> str:
    raise AssertionError(f"no command expected, got {list(argv)}")


def no_job_detail(argv: Sequence[str]) -> str:
    """A slurmctld that does not answer `scontrol show job -d` (several nodes ask it)."""
    if list(argv[:4]) == ["scontrol", "show", "job", "-d"]:
        raise slurm.SlurmTimeout(argv, "no answer")
    return no_commands(argv)


def test_outside_slurm_there_is_no_allocation() -> None:
    assert Allocation.from_env({"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0"}, run=no_commands) is None


def test_one_node_four_gpus() -> None:
    a = Allocation.from_env(ENV_ONE_NODE, run=no_commands)
    assert a == Allocation(
        job_id="1", nodes=("vm",), gpu_ids=(0, 1, 2, 3), cpus_per_node=(16,), restart_count=0,
        batch_node="vm",
    )
    assert a.gpus_per_node == 4 and a.cpus_on("vm") == 16 and a.cpus_on("other") is None


def test_requeued_run_counts_restarts() -> None:
    a = Allocation.from_env({**ENV_ONE_NODE, "SLURM_RESTART_COUNT": "2"}, run=no_commands)
    assert a is not None and a.restart_count == 2


def test_node_range_is_expanded_by_scontrol() -> None:
    env = {
        "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_CPUS_PER_NODE": "32(x2)",
        "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "SLURMD_NODENAME": "gpu07",
    }
    fake = FakeSlurm({("scontrol", "show", "hostnames", "gpu[07-08]"): "gpu07\ngpu08\n",
                      ("scontrol", "show", "job", "-d", "77"): None})
    a = Allocation.from_env(env, run=fake)
    assert a is not None
    assert a.nodes == ("gpu07", "gpu08") and a.cpus_per_node == (32, 32) and a.gpu_ids == (0, 1, 2, 3)
    assert a.gpus_on("gpu08") == (0, 1, 2, 3)  # Slurm did not say: the batch node's view


def test_plain_node_list_needs_no_command() -> None:
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "a1,b2", "SLURM_JOB_CPUS_PER_NODE": "16,8"}
    a = Allocation.from_env(env, run=no_job_detail)
    assert a is not None and a.nodes == ("a1", "b2") and a.cpus_per_node == (16, 8) and a.gpu_ids == ()


@pytest.mark.parametrize(
    ("gpu_env", "ids"),
    [
        # Shared node without device cgroups: the job holds GPUs 2 and 3 under their global index.
        ({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "2,3", "SLURM_GPUS_ON_NODE": "2"}, (2, 3)),
        # ConstrainDevices=yes renumbers them 0..k-1 inside the job, and so must a step.
        ({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_GPUS_ON_NODE": "2"}, (0, 1)),
        # MIG or UUID tokens: fall back to Slurm's indices.
        ({"SLURM_JOB_GPUS": "0", "CUDA_VISIBLE_DEVICES": "MIG-4f1c", "SLURM_GPUS_ON_NODE": "1"}, (0,)),
        # --gpus=8 over two nodes, no per-node variables.
        ({"SLURM_GPUS": "8", "SLURM_JOB_NUM_NODES": "2"}, (0, 1, 2, 3)),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, (0, 1)),
        ({"SLURM_JOB_GRES": "gpu:a100:2(IDX:0-1),shard:8"}, (0, 1)),
        # A CPU-only job; a CUDA_VISIBLE_DEVICES from the login shell is not the job's.
        ({"CUDA_VISIBLE_DEVICES": "0"}, ()),
    ],
)
def test_gpu_ids(gpu_env: dict[str, str], ids: tuple[int, ...]) -> None:
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "a,b" if "SLURM_GPUS" in gpu_env else "a", **gpu_env}
    a = Allocation.from_env(env, run=no_job_detail)
    assert a is not None and a.gpu_ids == ids


def test_cpus_fall_back_to_cpus_on_node() -> None:
    a = Allocation.from_env({"SLURM_JOB_ID": "3", "SLURM_NODELIST": "n1", "SLURM_CPUS_ON_NODE": "8"}, run=no_commands)
    assert a is not None and a.cpus_per_node == (8,)


@pytest.mark.parametrize(
    ("text", "counts"),
    [("16", (16,)), ("16(x2)", (16, 16)), ("32(x2),16", (32, 32, 16)), ("", ()), ("junk", ())],
)
def test_parse_cpus_per_node(text: str, counts: tuple[int, ...]) -> None:
    assert slurm.parse_cpus_per_node(text) == counts


@pytest.mark.parametrize(
    ("text", "n"),
    [("gpu:4", 4), ("gres:gpu:4", 4), ("gpu:a100:2", 2), ("gres/gpu=3", 3),
     ("gpu:a100:2(IDX:0-1),shard:8", 2), ("gpu", 1), ("shard:8", None), ("", None)],
)
def test_parse_gres_gpus(text: str, n: int | None) -> None:
    assert slurm.parse_gres_gpus(text) == n


# --- time left -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1-02:03:04", 93784.0), ("02:03:04", 7384.0), ("2:00", 120.0), ("4:59", 299.0), ("0:00", 0.0),
        ("364-23:59:58", 364 * 86400 + 86398.0), ("2-12", 216000.0), ("2-12:30", 217800.0),
        ("5", 300.0), ("UNLIMITED", math.inf), ("INVALID", None), ("NOT_SET", None), ("", None),
        ("garbage", None),
    ],
)
def test_parse_slurm_duration(text: str, seconds: float | None) -> None:
    assert slurm.parse_slurm_duration(text) == seconds


SHOW_JOB = """JobId=12 JobName=gpupack
   UserId=alice(1000) GroupId=alice(1000) MCS_label=N/A
   Priority=4294901759 Nice=0 Account=proj7 QOS=(null)
   JobState=RUNNING Reason=None Dependency=(null)
   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0
   RunTime=00:00:10 TimeLimit={limit} TimeMin=N/A
   StartTime=2026-11-22T06:35:55 EndTime={end} Deadline=N/A
   Partition=gpu AllocNode:Sid=login1:3407
   Command=/home/alice/my project/slurm/parallel.slurm exp.yaml --poll 2
   WorkDir=/home/alice/my project
   StdOut=/home/alice/my project/gpupack-12.out
   TresPerNode=gres:gpu:4
"""


def show_job(limit: str = "00:02:00", end: str = "2026-11-22T06:37:55") -> str:
    return SHOW_JOB.format(limit=limit, end=end)


def test_end_time_from_squeue() -> None:
    fake = FakeSlurm({("squeue", "-h", "-j", "12", "-o", "%L"): "1-02:03:04\n"})
    assert slurm.end_time("12", 1000.0, run=fake) == 1000.0 + 93784


def test_end_time_unlimited() -> None:
    fake = FakeSlurm({("squeue",): "UNLIMITED\n"})
    assert slurm.end_time("12", 1000.0, run=fake) == math.inf


def test_end_time_falls_back_to_scontrol_end_time() -> None:
    fake = FakeSlurm({("squeue",): None, ("scontrol", "show", "job", "12"): show_job()})
    expected = time.mktime(time.strptime("2026-11-22T06:37:55", "%Y-%m-%dT%H:%M:%S"))
    assert slurm.end_time("12", 0.0, run=fake) == expected
    fake = FakeSlurm({("squeue",): "INVALID\n", ("scontrol",): show_job(limit="UNLIMITED")})
    assert slurm.end_time("12", 0.0, run=fake) == math.inf


@pytest.mark.parametrize("scontrol", [None, show_job(end="Unknown"), ""])
def test_end_time_unknown(scontrol: str | None) -> None:
    fake = FakeSlurm({("squeue",): "NOT_SET\n", ("scontrol",): scontrol})
    assert slurm.end_time("12", 0.0, run=fake) is None


def test_clock_refreshes_at_most_every_refresh_s() -> None:
    ends = iter([1000.0, 1600.0])  # `scontrol update TimeLimit` moved the end by 10 minutes
    asked: list[float] = []

    def query(job: str, now: float) -> float | None:
        asked.append(now)
        return next(ends)

    clock = AllocationClock("12", refresh_s=60, query=query)
    assert clock.time_left_s(100.0) == 900.0
    assert clock.time_left_s(159.0) == 841.0  # 59 s later: no new query
    assert clock.time_left_s(160.0) == 1440.0
    assert asked == [100.0, 160.0]
    assert clock.time_left_s(2000.0) == 0.0  # past the end, not negative


def test_clock_keeps_last_end_when_slurm_does_not_answer() -> None:
    answers: list[float | None] = [1000.0, None]

    def query(job: str, now: float) -> float | None:
        if not answers:
            raise RuntimeError("a query must never take the engine down")
        return answers.pop(0)

    clock = AllocationClock("12", refresh_s=10, query=query)
    assert clock.time_left_s(0.0) == 1000.0
    assert clock.time_left_s(10.0) == 990.0
    assert clock.time_left_s(20.0) == 980.0


def test_clock_unlimited_or_unknown_is_none() -> None:
    assert AllocationClock("1", query=lambda j, now: math.inf).time_left_s(0.0) is None
    assert AllocationClock("1", query=lambda j, now: None).time_left_s(0.0) is None


# --- requeue / resubmit ----------------------------------------------------------------------


def test_requeue() -> None:
    assert slurm_requeue.requeue("12", run=FakeSlurm({("scontrol", "requeue", "12"): ""}))
    # --no-requeue: "Requested operation is presently disabled" and exit 1.
    assert not slurm_requeue.requeue("12", run=FakeSlurm({("scontrol", "requeue", "12"): None}))


def test_job_script_cuts_known_arguments_off_command() -> None:
    fake = FakeSlurm({("scontrol", "show", "job"): show_job()})
    args = ["exp.yaml", "--poll", "2"]
    assert slurm_requeue.job_script("12", args, run=fake) == "/home/alice/my project/slurm/parallel.slurm"
    assert slurm_requeue.job_script("12", run=fake) == "/home/alice/my"  # unknown arguments: first word
    wrapped = show_job().replace("Command=/home/alice/my project/slurm/parallel.slurm exp.yaml --poll 2", "Command=(null)")
    assert slurm_requeue.job_script("12", run=FakeSlurm({("scontrol",): wrapped})) is None


def test_resubmit_carries_command_line_options_over() -> None:
    fake = FakeSlurm({("scontrol", "show", "job", "12"): show_job(limit="04:00:00"), ("sbatch",): "13\n"})
    assert slurm_requeue.resubmit("/s/parallel.slurm", ["exp.yaml", "--poll", "2"], job_id="12", run=fake) == "13"
    assert fake.calls[-1] == [
        "sbatch", "--parsable", "--time=04:00:00", "--partition=gpu", "--account=proj7",
        "--chdir=/home/alice/my project", "/s/parallel.slurm", "exp.yaml", "--poll", "2",
    ]
    assert slurm_requeue.resubmit("/s/p.slurm", [], run=FakeSlurm({("sbatch",): None})) is None


def allocation(restarts: int) -> Allocation:
    return Allocation(job_id="12", nodes=("vm",), gpu_ids=(0, 1), cpus_per_node=(16,), restart_count=restarts)


def test_engine_hooks_requeue_until_the_bound() -> None:
    fake = FakeSlurm({("scontrol", "requeue", "12"): "", ("squeue",): "10:00\n", ("scontrol", "show", "job"): show_job()})
    hooks = slurm_requeue.engine_hooks(allocation(1), max_requeues=2, run_args=["m.yaml"], run=fake)
    assert hooks.requeue() == "requeued job 12 (run 3)"
    assert hooks.time_left(50.0) == 600.0
    assert hooks.cpus_per_node == {"vm": 16} and hooks.job_id == "12"
    fake.calls.clear()
    hooks = slurm_requeue.engine_hooks(allocation(2), max_requeues=2, run_args=["m.yaml"], run=fake)
    assert "requeued 2 times (--max-requeues 2)" in (hooks.requeue() or "")
    assert fake.calls == []


CANCEL_LINE = "slurmstepd-n1: error: *** JOB 12 ON n1 CANCELLED AT 2026-12-03T10:18:40{why} ***\n"


@pytest.mark.parametrize(
    ("state", "reason", "line", "expected"),
    [
        ("COMPLETING", "None", CANCEL_LINE.format(why=""), True),  # scancel, verbatim from the test cluster
        ("CANCELLED", "None", CANCEL_LINE.format(why=""), True),
        ("COMPLETING", "TimeLimit", CANCEL_LINE.format(why=" DUE TO TIME LIMIT"), False),
        ("COMPLETING", "None", CANCEL_LINE.format(why=" DUE TO PREEMPTION"), False),
        ("RUNNING", "None", "", False),  # the allocation's warning signal
        ("COMPLETING", "None", "", False),  # no line to tell why: requeue
        ("COMPLETING", "None", None, False),  # the log cannot be read: requeue
    ],
)
def test_a_cancelled_job_is_told_from_a_time_limit_and_a_preemption(
    tmp_path: Path, state: str, reason: str, line: str | None, expected: bool
) -> None:
    log = tmp_path / "gpupack-12.out"
    if line is not None:
        log.write_text("12:00:01 info      run started\n" + line + "12:00:02 stop      stopping: terminated (TERM)\n")
    info = show_job().replace("JobState=RUNNING Reason=None", f"JobState={state} Reason={reason}")
    info += f"   StdErr={log}\n"
    fake = FakeSlurm({("scontrol", "show", "job", "12"): info, ("scontrol", "requeue", "12"): ""})
    assert slurm_requeue.cancelled("12", run=fake) is expected
    said = slurm_requeue.engine_hooks(allocation(0), max_requeues=5, run_args=["m.yaml"], run=fake).requeue()
    assert said == ("not requeued: job 12 was cancelled (scancel); submit it again to resume" if expected else "requeued job 12 (run 2)")


def test_engine_hooks_resubmit_where_requeue_is_disabled() -> None:
    fake = FakeSlurm({
        ("scontrol", "requeue"): None,
        ("scontrol", "show", "job"): show_job(),
        ("sbatch",): "99\n",
    })
    hooks = slurm_requeue.engine_hooks(allocation(0), max_requeues=10, run_args=["exp.yaml", "--poll", "2"], run=fake)
    assert hooks.requeue() == (
        "requeue disabled for job 12; resubmitted /home/alice/my project/slurm/parallel.slurm as job 99"
    )
    assert fake.calls[-1][-4:] == ["/home/alice/my project/slurm/parallel.slurm", "exp.yaml", "--poll", "2"]


# --- step-creation backpressure ------------------------------------------------------------

# Verbatim srun stderr on the test cluster: a third 8-CPU step in a 16-CPU job.
SRUN_WAIT = "srun: Job 4 step creation temporarily disabled, retrying (Requested nodes are busy)"
SRUN_STILL = "srun: Job 4 step creation still disabled, retrying (Requested nodes are busy)"
SRUN_CREATED = "srun: Step created for job 4"


def test_srun_messages() -> None:
    assert slurm_steps.step_waiting(SRUN_WAIT) and slurm_steps.step_waiting(SRUN_STILL)
    assert not slurm_steps.step_waiting(SRUN_CREATED) and not slurm_steps.step_waiting("epoch 3 loss 0.2")
    assert slurm_steps.step_created(SRUN_CREATED) and not slurm_steps.step_created(SRUN_WAIT)


def test_throttle_rate_window() -> None:
    t = StepThrottle(max_per_s=2)
    assert t.may_launch(10.0)
    t.launched("a", 10.0)
    t.launched("b", 10.2)
    assert not t.may_launch(10.5)
    assert t.next_launch_at(10.5) == 11.0  # "a" leaves the one-second window
    assert t.may_launch(11.0)
    t.launched("c", 11.0)
    assert t.next_launch_at(11.1) == 11.2


def test_throttle_pauses_while_a_step_waits_for_creation() -> None:
    t = StepThrottle(max_per_s=100)
    t.launched("a", 0.0)
    t.observe("a", "some output\n" + SRUN_WAIT + "\n")
    assert t.waiting == {"a"} and not t.may_launch(5.0)
    t.observe("a", SRUN_STILL)
    t.launched("b", 0.1)
    t.observe("b", SRUN_WAIT)
    t.observe("a", SRUN_CREATED)
    assert t.waiting == {"b"} and not t.may_launch(5.0)
    t.ended("b")  # its srun exited (e.g. killed) without creating the step
    assert t.waiting == frozenset() and t.may_launch(5.0)


def test_throttle_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError, match="max_per_s must be >= 1"):
        StepThrottle(max_per_s=0)


# --- several nodes (captured on the two-node test cluster) ----------------------------------

# `sbatch -N2 --ntasks-per-node=1 -c16 --gres=gpu:4 --no-kill`, batch step on n1.
ENV_TWO_NODES = {
    "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURMD_NODENAME": "n1", "SLURM_CPUS_ON_NODE": "16",
    "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "16(x2)", "SLURM_JOB_GPUS": "0,1,2,3",
    "SLURM_JOB_ID": "14", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
}
SHOW_JOB_D = """JobId=14 JobName=env.sh
   JobState=RUNNING Reason=None Dependency=(null)
   NodeList=n[1-2]
   BatchHost=n1
   NumNodes=2 NumCPUs=32 NumTasks=2 CPUs/Task=16 ReqB:S:C:T=0:0:*:*
   JOB_GRES=gpu:8
     Nodes=n[1-2] CPU_IDs=0-15 Mem=0 GRES=gpu:4(IDX:0-3)
   MinCPUsNode=16 MinMemoryNode=0 MinTmpDiskNode=0
"""
# What a cluster of unlike nodes prints: one detail line per group of alike nodes.
SHOW_JOB_D_MIXED = """JobId=15 JobName=x
   NodeList=g[1-3]
     Nodes=g[1-2] CPU_IDs=0-31 Mem=0 GRES=gpu:h100:4(IDX:0-3)
     Nodes=g3 CPU_IDs=0-15 Mem=0 GRES=gpu:a100:2(IDX:1,3)
"""


def test_two_nodes_each_with_its_own_gpus() -> None:
    fake = FakeSlurm({
        ("scontrol", "show", "hostnames", "n[1-2]"): "n1\nn2\n",
        ("scontrol", "show", "job", "-d", "14"): SHOW_JOB_D,
    })
    a = Allocation.from_env(ENV_TWO_NODES, run=fake)
    assert a is not None and a.nodes == ("n1", "n2") and a.batch_node == "n1"
    assert a.cpus_per_node == (16, 16)
    assert a.gpus_on("n1") == (0, 1, 2, 3) and a.gpus_on("n2") == (0, 1, 2, 3)


def test_unlike_nodes_are_read_not_assumed() -> None:
    fake = FakeSlurm({
        ("scontrol", "show", "hostnames", "g[1-3]"): "g1\ng2\ng3\n",
        ("scontrol", "show", "hostnames", "g[1-2]"): "g1\ng2\n",
        ("scontrol", "show", "job", "-d", "15"): SHOW_JOB_D_MIXED,
    })
    env = {"SLURM_JOB_ID": "15", "SLURM_JOB_NODELIST": "g[1-3]", "SLURMD_NODENAME": "g3",
           "SLURM_JOB_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "1,3"}
    a = Allocation.from_env(env, run=fake)
    assert a is not None and a.gpus_on("g3") == (1, 3) and a.gpus_on("g1") == (0, 1, 2, 3)
    # ConstrainDevices: the batch step sees 0..k-1, and so does a step on any node.
    a = Allocation.from_env({**env, "CUDA_VISIBLE_DEVICES": "0,1"}, run=fake)
    assert a is not None and a.gpus_on("g3") == (0, 1) and a.gpus_on("g2") == (0, 1, 2, 3)


def test_one_node_asks_nothing_about_nodes() -> None:
    a = Allocation.from_env(ENV_ONE_NODE, run=no_commands)
    assert a is not None and a.node_gpu_ids == {} and a.gpus_on("vm") == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "text,ids",
    [("gpu:4(IDX:0-3)", (0, 1, 2, 3)), ("gpu:a100:2(IDX:0,2)", (0, 2)), ("gpu:2(IDX:1-2),shard:0(0/8)", (1, 2)),
     ("gpu:h100:1(IDX:0),gpu:a100:2(IDX:1-2)", (0, 1, 2)), ("", ()), ("shard:2(IDX:0)", ()), ("gpu:0", ())],
)
def test_gres_indices(text: str, ids: tuple[int, ...]) -> None:
    assert slurm.gres_indices(text) == ids


# --- nodes lost, reader steps -------------------------------------------------------------

SHOW_NODE_DOWN = """NodeName=n2 Arch=x86_64 CoresPerSocket=1
   NodeAddr=10.1.0.2 NodeHostName=localhost Port=6839 Version=22.05.8
   State=DOWN ThreadsPerCore=1 TmpDisk=0 Weight=1 Owner=N/A MCS_label=N/A
   Reason=test it [root@2026-12-03T07:55:11]
"""


def test_node_watch_sees_a_node_leave_the_job() -> None:
    from gpupack.slurm_nodes import NodeWatch

    answers: dict[tuple[str, ...], str | None] = {
        ("scontrol", "show", "job", "14"): SHOW_JOB_D,
        ("scontrol", "show", "hostnames", "n[1-2]"): "n1\nn2\n",
        ("scontrol", "show", "node", "n2"): SHOW_NODE_DOWN,
    }
    fake = FakeSlurm(answers)
    watch = NodeWatch("14", ("n1", "n2"), run=fake, every_s=5)
    assert watch.lost(0.0) == {}
    answers[("scontrol", "show", "job", "14")] = SHOW_JOB_D.replace("NodeList=n[1-2]", "NodeList=n1")
    assert watch.lost(1.0) == {}  # asked at most every 5 s ...
    assert watch.lost(1.5, force=True) == {"n2": "left the allocation (down: test it)"}  # ... unless forced
    answers[("scontrol", "show", "job", "14")] = None  # slurmctld busy: what is lost stays lost
    assert watch.lost(10.0) == {"n2": "left the allocation (down: test it)"}


def test_node_address_and_reader_step() -> None:
    from gpupack.slurm_nodes import node_address, node_failures, reader_argv

    assert node_address("n2", run=FakeSlurm({("scontrol", "show", "node"): SHOW_NODE_DOWN})) == "10.1.0.2"
    assert node_address("n2", run=FakeSlurm({("scontrol", "show", "node"): None})) == "n2"
    assert node_failures("x\nsrun: error: Node failure on n2\nsrun: error: Node failure on n3\n") == {"n2", "n3"}
    assert reader_argv("n2", "/venv/bin/python", 5.0, "/runs/x", "4x80GB", node_gpus=2) == [
        "srun", "--overlap", "-N1", "-n1", "--nodelist=n2", "--job-name=gpupack-reader", "--gpus=2", "--mem=0", "--export=ALL",
        "/venv/bin/python", "-m", "gpupack._reader", "--node", "n2", "--every", "5", "--run-dir", "/runs/x",
        "--gpus", "4x80GB", "--nodes", "",
    ]


def test_srun_argv_multi_node_step() -> None:
    argv = srun_argv(name="ddp", node="n2", gpu_indices=(0, 1, 2, 3), cpus=8, mode="gres-none", inner_argv=INNER,
                     nodes=("n2", "n1"), master_addr="10.1.0.2")
    shim = argv.index("gpupack-rank")
    assert argv[:shim - 2] == [
        "srun", "--exact", "-N", "2", "-n", "2", "--ntasks-per-node=1", "--nodelist=n2,n1", "--job-name=ddp",
        "--cpus-per-task=8", "--mem=0", "--kill-on-bad-exit=1", "--export=ALL", "--gres=none",
        "env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "env", "MASTER_ADDR=10.1.0.2", "/bin/sh",
    ]
    assert argv[shim + 1:] == INNER


@pytest.mark.parametrize(
    ("node", "node_id", "rank"),
    [("n2", "1", "0"), ("n1", "0", "1"), ("n9", "1", "1")],  # rank order is GPUPACK_NODES's, not Slurm's
)
def test_multi_node_task_takes_its_rank_from_its_node(node: str, node_id: str, rank: str) -> None:
    import subprocess

    argv = srun_argv(name="ddp", node="n2", gpu_indices=(), cpus=1, mode="gres-none",
                     inner_argv=["sh", "-c", 'echo "$RANK $NODE_RANK $GPUPACK_NODE_RANK $MASTER_ADDR"'],
                     nodes=("n2", "n1"), master_addr="10.1.0.2")
    task = argv[argv.index("--gres=none") + 1:]  # what each task runs
    env = {"PATH": "/usr/bin:/bin", "GPUPACK_NODES": "n2,n1", "GPUPACK_NNODES": "2", "SLURMD_NODENAME": node,
           "SLURM_NODEID": node_id}
    out = subprocess.run(task, env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == [rank, rank, rank, "10.1.0.2"]


def test_reader_step_holds_the_nodes_gpus_and_srun_forgets_the_jobs_gpu_total() -> None:
    from gpupack.slurm_nodes import reader_argv, srun_env

    assert "--gres=none" in reader_argv("n2", "python3", 1, "/r", node_gpus=0)
    assert not any(a.startswith("--gres") for a in reader_argv("n2", "python3", 1, "/r"))  # unknown: Slurm's default
    assert srun_env({"SLURM_GPUS": "6", "SLURM_JOB_ID": "5"}) == {"SLURM_JOB_ID": "5"}


def test_a_command_without_an_answer_says_which_way() -> None:
    with pytest.raises(slurm.SlurmMissing, match="no-such-slurm-binary"):
        slurm.run_command(["no-such-slurm-binary", "show", "job"])
    with pytest.raises(slurm.SlurmFailed) as failed:
        slurm.run_command(["sh", "-c", "echo 'Requested operation is presently disabled' >&2; exit 1"])
    assert failed.value.returncode == 1 and "presently disabled" in failed.value.stderr
    with pytest.raises(slurm.SlurmTimeout):
        slurm.run_command(["sleep", "30"], timeout_s=0.05)
    assert slurm.run_command(["echo", "12"]) == "12\n"


@pytest.mark.parametrize("error", [
    slurm.SlurmMissing(["squeue"], "not found"),
    slurm.SlurmTimeout(["squeue"], "no answer"),
    slurm.SlurmFailed(["squeue"], 1, "Invalid job id"),
])
def test_facts_are_unknown_whatever_the_failure(error: slurm.SlurmError) -> None:
    def broken(argv: Sequence[str]) -> str:
        raise error

    assert slurm.end_time("12", 0.0, run=broken) is None
    assert slurm.show_job("12", run=broken) is None
    assert slurm.expand_nodelist("n[1-2]", run=broken) == ()
    assert not slurm_requeue.requeue("12", run=broken)
    assert slurm_steps.detect_gpu_mode(None, run=broken) == "overlap"


@pytest.mark.parametrize("state,preempt_time,expected", [
    ("RUNNING", None, None),  # no preemption configured: no PreemptTime field at all
    ("RUNNING", "None", None),
    ("RUNNING", "2026-12-03T13:43:37", "preempted"),  # running out its GraceTime
    ("COMPLETING", "None", "COMPLETING"),  # scancel
    ("TIMEOUT", "None", "TIMEOUT"),
])
def test_job_ending_reads_the_state_and_a_preemption(state: str, preempt_time: str | None, expected: str | None) -> None:
    info = show_job().replace("JobState=RUNNING", f"JobState={state}")
    if preempt_time is not None:
        info += f"   PreemptEligibleTime=2026-12-03T13:43:34 PreemptTime={preempt_time}\n"
    assert slurm.job_ending("12", run=FakeSlurm({("scontrol", "show", "job", "12"): info})) == expected
    assert slurm.job_ending("12", run=FakeSlurm({("scontrol",): None})) is None  # no answer: runs on
