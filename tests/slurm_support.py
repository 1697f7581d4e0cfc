"""Fixtures and helpers for tests against the local Slurm test cluster.

`python -m pytest` starts the cluster itself: the first test that needs it starts
`slurm/testcluster/start.sh --nodes 2` once per session (root on Debian; the first time it
apt-get installs munge and Slurm) and stops it at the end, unless SLURM_CONF already names a
cluster that answers, which is used as it is and left running. Where start.sh cannot run (exit 77:
no root, no apt, not Debian) the tests are skipped with its reason, unless GPUPACK_REQUIRE_SLURM=1
(CI), where that is a failure. Everything waits by polling squeue, scontrol or files with a
deadline, never by sleeping blind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gpupack import slurm

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def answer_problem(conf: str) -> str | None:
    """Why no cluster answers at `conf` (sinfo missing or failing), or None when one does."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T %G %c"], capture_output=True, text=True, timeout=15,
                              env={**os.environ, "SLURM_CONF": conf})
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo cannot run: {exc}"
    if done.returncode != 0:
        return f"sinfo fails with SLURM_CONF={conf}: {done.stderr.strip()}"
    return None


def identity_problem(conf: str) -> str | None:
    """Why the cluster answering at `conf` is not the test cluster (4 GPUs, 16 CPUs a node)."""
    done = subprocess.run(["sinfo", "-h", "-o", "%T %G %c"], capture_output=True, text=True, timeout=15,
                          env={**os.environ, "SLURM_CONF": conf})
    state, gres, cpus = (done.stdout.split() + ["", "", ""])[:3]
    if "gpu:4" not in gres or not cpus.isdigit() or int(cpus) < 16:
        return f"the cluster at SLURM_CONF={conf} is not the test cluster (node: {gres} {cpus} CPUs, want gpu:4, 16)"
    return None


def _slurmctld_pid() -> str:
    """The pid in start.sh's slurmctld pid file ('' when none): a new one after start.sh means this
    session started the cluster (and so stops it), the same one that it found it running."""
    state_dir = Path(os.environ.get("GPUPACK_SLURM_DIR", "/tmp/gpupack-slurm-test"))
    try:
        return (state_dir / "run" / "slurmctld.pid").read_text().strip()
    except OSError:
        return ""


def _unavailable(problem: str) -> None:
    if os.environ.get("GPUPACK_REQUIRE_SLURM") == "1":
        pytest.fail(f"GPUPACK_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)


def running_cluster() -> Iterator[str]:
    """Body of conftest's session fixture `slurm_cluster`: SLURM_CONF of a running test cluster,
    started here (and stopped after the session) when none answers; skips with the reason, or
    fails under GPUPACK_REQUIRE_SLURM=1, where it cannot run."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not answer_problem(conf):
        problem = identity_problem(conf)
        if problem:
            _unavailable(problem)  # somebody's real cluster: never start a second one beside it
        yield conf
        return
    before = _slurmctld_pid()
    with tempfile.TemporaryFile("w+") as log:  # apt-get's output: a pipe could fill up unread
        done = subprocess.run(["bash", str(ROOT / "slurm" / "testcluster" / "start.sh"), "--nodes", "2"],
                              stdout=subprocess.PIPE, stderr=log, text=True, timeout=900)
        log.seek(0)
        lines = log.read().strip().splitlines()
    if done.returncode == 77:  # cannot run here: start.sh's one-line reason
        _unavailable(lines[-1] if lines else "slurm/testcluster/start.sh cannot run here")
    if done.returncode != 0:
        tail = "\n".join(lines[-30:])
        pytest.fail(f"slurm/testcluster/start.sh --nodes 2 failed (exit {done.returncode}):\n{tail}")
    conf = done.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    started = _slurmctld_pid() != before
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # gpupack.slurm's own calls (scontrol show job) read it
    try:
        yield conf
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if started:
            subprocess.run(["bash", str(ROOT / "slurm" / "testcluster" / "stop.sh")],
                           capture_output=True, text=True, timeout=300)


def cluster_nodes(env: dict[str, str], usable: bool = True) -> list[str]:
    """The test cluster's nodes with 4 GPUs each (`usable`: only those that take jobs now)."""
    done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], env=env, capture_output=True, text=True, timeout=15)
    nodes = []
    for line in done.stdout.splitlines():
        name, state, gres = (line.split() + ["", "", ""])[:3]
        ok = state.rstrip("*") in ("idle", "mixed", "allocated", "completing") or not usable
        if "gpu:4" in gres and ok and name not in nodes:
            nodes.append(name)
    return nodes


@pytest.fixture(scope="session")
def slurm_env(slurm_cluster: str) -> dict[str, str]:
    """Environment for sbatch: the test cluster's SLURM_CONF and this checkout on PYTHONPATH."""
    env = dict(os.environ)
    env["SLURM_CONF"] = slurm_cluster
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["GPUPACK_PYTHON"] = sys.executable
    for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        del env[name]  # tests run from inside a job must not leak that job's options
    return env


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 0.1) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


class Jobs:
    """Submits jobs and, at teardown, cancels what is left and waits until the queue is empty
    of them: a COMPLETING job on a one-node cluster holds up every later job."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.ids: list[str] = []

    def sbatch(self, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run(
            ["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, f"sbatch {' '.join(args)}: {done.stderr.strip()}"
        job = done.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def info(self, job: str) -> dict[str, str]:
        return slurm.show_job(job) or {}

    def state(self, job: str) -> str:
        return self.info(job).get("JobState", "")

    def wait_state(self, job: str, states: set[str], timeout_s: float) -> dict[str, str]:
        return wait_for(
            f"job {job} to be {'/'.join(sorted(states))} (is {self.state(job) or 'gone'})",
            lambda: (lambda i: i if i.get("JobState") in states else None)(self.info(job)),
            timeout_s,
        )

    def wait_gone(self, job: str, timeout_s: float = 60) -> None:
        def gone() -> bool:
            out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=self.env,
                                 capture_output=True, text=True, timeout=15)
            return out.returncode != 0 or not out.stdout.strip()

        wait_for(f"job {job} to leave the queue", gone, timeout_s)

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], env=self.env, capture_output=True, timeout=30)
            for job in self.ids:
                self.wait_gone(job)


@pytest.fixture
def jobs(slurm_env: dict[str, str]) -> Iterator[Jobs]:
    j = Jobs(slurm_env)
    try:
        yield j
    finally:
        j.cancel_all()


def wait_for_file(path: Path, timeout_s: float, contains: str = "") -> str:
    """Text of `path` once it exists (and contains `contains`)."""
    def ready() -> str | None:
        try:
            text = path.read_text()
        except OSError:
            return None
        return text if contains in text and text else None

    return wait_for(f"{path}" + (f" to contain {contains!r}" if contains else ""), ready, timeout_s)


def python_script(path: Path, body: str) -> Path:
    """A batch script run by this interpreter (sbatch honours any #! line)."""
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


RECORD = f"python3 {ROOT}/tests/bin/record.py"  # the engine tests' stand-in experiment


def submit_gpupack(jobs: Jobs, workdir: Path, manifest: Path, *run_args: str, sbatch_args: tuple[str, ...] = ()) -> str:
    """`sbatch [sbatch_args] slurm/parallel.slurm MANIFEST [run_args]` from `workdir`, with
    simulated GPUs (the test cluster's GPUs are /dev/null) and a fast tick."""
    return jobs.sbatch(*sbatch_args, str(ROOT / "slurm" / "parallel.slurm"), str(manifest),
                       "--gpus", "4x80GB", "--poll", "1", *run_args, cwd=workdir)


def gpupack_status(env: dict[str, str], run_dir: Path) -> dict[str, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "gpupack", "status", str(run_dir), "--json"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return {e["name"]: e for e in json.loads(done.stdout)["experiments"]}


def wait_job_done(jobs: Jobs, job: str, log: Path, timeout_s: float) -> dict[str, str]:
    """The job's final `scontrol show job` once it has left the queue for good (not requeued)."""
    info = jobs.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout_s)
    assert info["JobState"] == "COMPLETED", f"job {job} {info['JobState']}:\n{log.read_text() if log.exists() else ''}"
    return info


@pytest.fixture
def two_nodes(slurm_env: dict[str, str]) -> list[str]:
    """Two nodes of the test cluster (`start.sh --nodes 2`); skipped on a one-node cluster,
    failed instead when GPUPACK_REQUIRE_SLURM=1 (CI starts the two-node cluster)."""
    nodes = cluster_nodes(slurm_env, usable=False)
    if len(nodes) < 2:
        problem = f"the test cluster has {len(nodes)} node(s), these tests need 2: start it with --nodes 2"
        if os.environ.get("GPUPACK_REQUIRE_SLURM") == "1":
            pytest.fail(f"GPUPACK_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    # A node an earlier test set down comes back by itself (ReturnToService=2) within seconds.
    return wait_for(f"nodes {nodes[:2]} to take jobs", lambda: (lambda u: u if len(u) >= 2 else None)(cluster_nodes(slurm_env)), 60)[:2]
