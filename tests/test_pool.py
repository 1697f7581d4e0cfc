"""The GPUs of several nodes as one probe (gpupack.pool) and the node reader (gpupack._reader),
without Slurm: the readers are real `python -m gpupack._reader` processes on this machine, so
their protocol, a reader that dies (restarted) and one that goes silent (its GPUs unavailable)
are exercised for real; only the clock that judges silence is a test's. The same code runs
under srun on the two-node test cluster in test_slurm_multinode.py."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import spawned

from gpupack import _reader
from gpupack.gpus import Reading, SimulatedProbe, parse_gpu_spec
from gpupack.srun import SrunLauncher
from gpupack.policy import GpuSnapshot, Occupant
from gpupack.pool import NodeReader, PoolProbe, stale_limit_s

ROOT = Path(__file__).resolve().parent.parent
GB = 10**9


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reader(node: str, clock: Clock, every_s: float = 0.1, spec: str = "4x80GB") -> NodeReader:
    argv = [sys.executable, "-m", "gpupack._reader", "--node", node, "--every", str(every_s), "--gpus", spec,
            "--run-dir", "/runs/x"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return NodeReader(node, argv, env, clock=clock)


def heard(r: NodeReader) -> bool:
    """Whether a new reading arrives (on the reader's thread) within 20 s."""
    import time

    deadline = time.monotonic() + 20
    first = r.lines
    while time.monotonic() < deadline:
        if r.latest()[0] is not None and r.lines > first:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> Iterator[PoolProbe]:
    """n1 read in-process, n2 by a reader process; both 4 x 80 GB simulated."""
    local = SimulatedProbe(parse_gpu_spec("4x80GB", "n1"))
    p = PoolProbe(local, [reader("n2", clock)], stale_s=30, restart_every_s=5, clock=clock)
    try:
        yield p
    finally:
        p.close()


def started(pool: PoolProbe) -> tuple[NodeReader, subprocess.Popen[str]]:
    """The pool started, its reader heard from: (reader, its process)."""
    assert pool.start(timeout_s=30) == []
    r = pool.readers[0]
    assert heard(r) and r._proc is not None
    return r, r._proc


def running_on(node: str, gpu: int, budget: int) -> dict[str, Occupant]:
    return {"x": Occupant(name="x", gpus=((node, gpu),), budget_bytes=budget, exclusive=False, observed_bytes=0, cpus=1)}


# --- wire format ------------------------------------------------------------------------------


def test_reader_lines_round_trip() -> None:
    gpus = parse_gpu_spec("2x40GB", "n2")
    inv = _reader.parse_line(_reader.inventory_line("n2", gpus, simulated=False))
    back = _reader.inventory_from(inv, "n2")
    assert back == gpus
    snaps = (GpuSnapshot("n2", 0, 40 * GB, 30 * GB, 55.0, "SIM-n2-0"),
             GpuSnapshot("n2", 1, 40 * GB, None, None, "SIM-n2-1", "NVML readings failing (Unknown Error)"))
    reading = Reading(snaps, {"2:train-a": {("n2", 1): 7 * GB}, "1:train-a": {("n2", 0): GB}})
    obj = _reader.parse_line(_reader.reading_line("n2", reading, 12.5))
    assert obj["t"] == 12.5
    # A failed reading stays None, not 0; only the current attempt's memory counts.
    assert _reader.reading_from(obj, back, {"train-a": 2}) == Reading(snaps, {"train-a": {("n2", 1): 7 * GB}})
    assert _reader.reading_from(obj, back, {"train-b": 1}).usage == {}
    assert _reader.reading_from(obj, back).usage == {"train-a": {("n2", 1): 7 * GB, ("n2", 0): GB}}


def test_reader_attributes_memory_to_this_runs_attempts(tmp_path: Path) -> None:
    env = {**os.environ, "GPUPACK_RUN_DIR": str(tmp_path), "GPUPACK_EXPERIMENT": "train-a", "GPUPACK_ATTEMPT": "3"}
    child = spawned(["sleep", "30"], env)
    other = spawned(["sleep", "30"], {**env, "GPUPACK_RUN_DIR": "/elsewhere"})
    try:
        probe = _reader.AttemptNvmlProbe.__new__(_reader.AttemptNvmlProbe)  # no NVML here: only the attribution
        probe.run_dir = str(tmp_path)
        assert probe._owner(child.pid) == "3:train-a"
        assert probe._owner(other.pid) is None and probe._owner(os.getpid()) is None
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("line", ["srun: error: Node failure on n2\n", "{torn", "[1, 2]\n", '{"kind": "other"}\n'])
def test_lines_that_are_not_a_readers_are_told_apart(line: str) -> None:
    with pytest.raises(_reader.WireError):
        _reader.parse_line(line)


def test_serve_writes_the_inventory_then_readings() -> None:
    out = io.StringIO()
    probe = SimulatedProbe(parse_gpu_spec("2x80GB", "n3"))
    _reader.serve("n3", probe, True, 5.0, out, clock=lambda: 7.0, sleep=lambda s: None, count=2)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["kind"] for x in lines] == ["inventory", "reading", "reading"]
    assert lines[0]["simulated"] is True and len(lines[0]["gpus"]) == 2
    assert lines[1]["gpus"] == [[0, 80 * GB, 0.0, ""], [1, 80 * GB, 0.0, ""]]


def test_reader_says_in_one_line_why_it_cannot_read() -> None:
    done = subprocess.run([sys.executable, "-m", "gpupack._reader", "--node", "n9", "--gpus", "4xlots"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("gpupack reader on n9: cannot read GPUs: --gpus: bad GPU spec") and "Traceback" not in done.stderr


def test_stale_limit() -> None:
    assert stale_limit_s(5, {}) == 30
    assert stale_limit_s(5, {"GPUPACK_READER_STALE_S": "3"}) == 15  # never under three intervals
    assert stale_limit_s(1, {"GPUPACK_READER_STALE_S": "4"}) == 4


# --- the pool -----------------------------------------------------------------------------------


def test_pool_is_every_nodes_gpus(pool: PoolProbe) -> None:
    started(pool)
    assert [(g.node, g.index) for g in pool.inventory()] == [("n1", i) for i in range(4)] + [("n2", i) for i in range(4)]
    # A simulated node's memory comes from what runs there, as on the batch node.
    reading = pool.read(running_on("n2", 3, 60 * GB))
    free = {(g.node, g.index): g.free_bytes for g in reading.gpus}
    assert free[("n2", 3)] == 20 * GB and free[("n1", 3)] == 80 * GB
    assert not any(g.unavailable for g in reading.gpus)


def test_a_silent_node_is_unavailable_until_it_is_heard_again(pool: PoolProbe, clock: Clock) -> None:
    r, proc = started(pool)
    os.kill(proc.pid, signal.SIGSTOP)  # alive but silent, like a wedged node
    try:
        clock.now += 31
        reading = pool.read({})
        lost = [g for g in reading.gpus if g.node == "n2"]
        assert len(lost) == 4 and all(g.unavailable == "not heard from for over 30s" for g in lost)
        assert all(g.free_bytes is None for g in lost)  # unknown, not free
        assert not any(g.unavailable for g in reading.gpus if g.node == "n1")
        clock.now += 10
        # The same words while it lasts: the engine logs a change of reason, not every tick.
        assert {g.unavailable for g in pool.read({}).gpus if g.node == "n2"} == {"not heard from for over 30s"}
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert heard(r)
    assert not any(g.unavailable for g in pool.read({}).gpus)


def test_a_reader_that_dies_is_started_again(pool: PoolProbe, clock: Clock) -> None:
    r, first = started(pool)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    pool.read({})
    assert r.starts == 1  # not before restart_every_s since its start
    clock.now += 5
    pool.read({})
    assert r.starts == 2 and r._proc is not first
    assert heard(r)


class Lost:
    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.forced = 0

    def lost(self, now: float, force: bool = False) -> Mapping[str, str]:
        self.forced += force
        return self.nodes


def test_a_lost_node_is_unavailable_for_good_and_its_reader_not_restarted(clock: Clock) -> None:
    watch = Lost()
    local = SimulatedProbe(parse_gpu_spec("4x80GB", "n1"))
    pool = PoolProbe(local, [reader("n2", clock)], watch=watch, clock=clock)
    try:
        assert pool.start(timeout_s=30) == []
        r = pool.readers[0]
        assert heard(r)
        watch.nodes["n2"] = "left the allocation (idle: test)"
        r.stop()
        clock.now += 60
        reading = pool.read({})
        assert watch.forced == 1  # a reader that ended makes the pool ask Slurm at once
        pool.read({})
        assert watch.forced == 1  # once, not on every tick while it stays ended
        assert {g.unavailable for g in reading.gpus if g.node == "n2"} == {"left the allocation (idle: test)"}
        assert r.starts == 1 and not r.running()
    finally:
        pool.close()


def test_a_node_whose_reader_never_answers_is_left_out(clock: Clock) -> None:
    local = SimulatedProbe(parse_gpu_spec("4x80GB", "n1"))
    bad = reader("n2", clock, spec="4xlots")
    pool = PoolProbe(local, [bad], clock=clock)
    try:
        left_out = pool.start(timeout_s=30)
        assert len(left_out) == 1 and left_out[0].startswith(
            "node n2: GPUs not read (gpupack reader on n2: cannot read GPUs: --gpus: bad GPU spec '4xlots'")
        assert left_out[0].endswith("); it is left out of the pool")
        assert {g.node for g in pool.inventory()} == {"n1"}
        assert {g.node for g in pool.read({}).gpus} == {"n1"}
    finally:
        pool.close()


# --- a step lost with its node -----------------------------------------------------------------


def test_srun_launcher_tells_a_lost_step_from_a_finished_one(tmp_path: Path) -> None:
    from gpupack.launch import LaunchSpec

    lost: dict[str, str] = {}
    asked: list[bool] = []

    def lost_nodes(force: bool) -> Mapping[str, str]:
        asked.append(force)
        return lost

    launcher = SrunLauncher("gres-none", node_gpus={"n1": 4, "n2": 2}, lost_nodes=lost_nodes)
    specs = {}
    for name, node in (("a", "n1"), ("b", "n2")):
        log = tmp_path / name / "attempt-1.log"
        log.parent.mkdir()
        log.write_text("earlier attempt: srun: error: Node failure on n2\n")  # not this attempt's
        specs[name] = LaunchSpec(name, 2, "true", tmp_path, {}, log, node, (0,), ("0",), 1)
        launcher._steps[name] = (log, log.stat().st_size, (node,))
    assert launcher.lost("a", 0) is None and launcher.lost("b", 0) is None and asked == [False, False]
    with open(specs["b"].log_path, "a") as f:
        f.write("srun: error: Node failure on n2\n")
    assert launcher.lost("b", 0) == "node failure on n2 (srun)" and asked[-1] is True
    lost["n2"] = "left the allocation (idle: test)"
    assert launcher.lost("b", 0) == "node n2 left the allocation (idle: test)"
    assert launcher.lost("a", 0) is None
    assert launcher.argv(specs["b"])[:2] == ["srun", "--exact"]
    overlap = SrunLauncher("overlap", node_gpus={"n1": 4, "n2": 2})
    assert "--gpus=2" in overlap.argv(specs["b"]) and "--gpus=4" in overlap.argv(specs["a"])


def test_srun_launcher_calls_a_step_killed_while_slurm_ends_the_job_an_interruption(tmp_path: Path) -> None:
    # scancel, a time limit or a preemption signals every step with the batch step: a step's srun
    # may exit 143 before gpupack hears its own signal, and that is no failure of the experiment.
    job_state: list[str | None] = [None]
    asked: list[int] = []

    def job_ending() -> str | None:
        asked.append(1)
        return job_state[0]

    launcher = SrunLauncher("gres-none", node_gpus=4, job_ending=job_ending)
    for name in ("a", "b", "c"):
        log = tmp_path / f"{name}.log"
        log.write_text("srun: error: n1: task 0: Terminated\n")
        launcher._steps[name] = (log, 0, ("n1",))
    assert launcher.lost("a", 1) is None and asked == []  # an exit code of its own: Slurm not asked
    assert launcher.lost("a", 143) is None and len(asked) == 1  # killed while the job runs on: a failure
    assert launcher.allocation_ending() is None
    job_state[0] = "COMPLETING"
    assert launcher.lost("b", 143) == "Slurm is ending the job (COMPLETING)"
    job_state[0] = None  # once ending, always ending: no question per step of a large allocation
    assert launcher.lost("c", 137) == "Slurm is ending the job (COMPLETING)" and len(asked) == 2
    assert launcher.allocation_ending() == "COMPLETING"  # the engine stops as if signalled


@pytest.mark.parametrize(
    ("visible", "ids"),
    [(None, ["0", "1", "2", "3"]), ("0,1", ["0", "1"]), ("2,3", ["2", "3"]), ("1,7", ["1"]), ("", [])],
)
def test_a_simulated_node_has_the_gpus_the_job_holds_there(visible: str | None, ids: list[str]) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    gpus = _reader.simulated_node("4x80GB", "n2", env)
    assert [g.cuda_id for g in gpus] == ids and [g.index for g in gpus] == list(range(len(ids)))
    assert all(g.node == "n2" and g.total_bytes == 80 * GB for g in gpus)


def test_a_spec_of_several_nodes_gives_each_node_its_own() -> None:
    names = ("g1", "g2")
    assert [g.total_bytes for g in _reader.simulated_node("4x80GB+2x40GB", "g2", {}, names)] == [40 * GB] * 2
    assert [g.total_bytes for g in _reader.simulated_node("4x80GB+2x40GB", "g1", {}, names)] == [80 * GB] * 4
    assert len(_reader.simulated_node("4x80GB", "g2", {}, names)) == 4  # one node's spec: every node's
