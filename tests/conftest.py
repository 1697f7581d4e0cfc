"""Shared helpers: run the real `gpupack` CLI in a subprocess with simulated GPUs; the session's
Slurm test cluster (`slurm_cluster`, see slurm_support.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpupack_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SLURM_JOB_ID", None)  # tests of the local path must not think they are in a job
    env.pop("GPUPACK_GPUS", None)
    env.update(extra)
    return env


def gpupack(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpupack", *args],
        capture_output=True, text=True, timeout=timeout, env=env or gpupack_env(), cwd=ROOT,
    )


def start_gpupack(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gpupack", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or gpupack_env(), cwd=ROOT,
    )


def status(run_dir: Path) -> dict[str, Any]:
    done = gpupack("status", str(run_dir), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def spawned(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`argv` started with `env`, once it has exec'd: until then /proc shows the forked child
    with this process's command line and environment."""
    proc = subprocess.Popen(argv, env=env)
    wanted = "\0".join(argv).encode() + b"\0"
    wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes() == wanted, what=f"{argv[0]} to start")
    return proc


def by_name(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in status(run_dir)["experiments"]}


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a file-system condition (the experiments' own marks), bounded in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """SLURM_CONF of the Slurm test cluster, started once for the whole session where none answers
    (defined here, not in slurm_support, so that it is one fixture however many modules use it)."""
    from slurm_support import running_cluster

    yield from running_cluster()


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "m.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


RECORD = f"python3 {ROOT}/tests/bin/record.py"


def seen(run_dir: Path, name: str, attempt: int = 1) -> dict[str, Any]:
    return json.loads((run_dir / "exp" / name / f"seen-{attempt}.json").read_text())


def started(run_dir: Path, name: str, attempt: int = 1) -> Path:
    return run_dir / "exp" / name / f"started-{attempt}"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Largest number of intervals open at one instant."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    level = best = 0
    for _, step in points:
        level += step
        best = max(best, level)
    return best


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
