"""Recovery and adopted process groups against real processes: a pid is trusted only with its
start time, and an attempt whose pgid was never recorded is found by its identity."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import alive, gpupack_env, start_gpupack, wait_for
from gpupack import procs, recovery
from gpupack.launch import Handle
from gpupack.manifest import load_text
from gpupack.store import A_INTERRUPTED, ExperimentRow, Store

MANIFEST = """
name: r
phases:
  - name: p
    experiments:
      - {name: train, cmd: "sleep 60", mem: 1GB}
"""


@pytest.fixture
def run(tmp_path: Path) -> Iterator[tuple[Store, dict, Path]]:
    manifest = load_text(MANIFEST, tmp_path / "m.yaml")
    run_dir = manifest.run_dir
    run_dir.mkdir(parents=True)
    store = Store(run_dir / "state.db")
    store.sync_experiments([ExperimentRow("train", "p", "train", 0, "f", "pending", None, {}, {}, True)])
    yield store, {e.name: e for e in manifest.experiments}, run_dir
    store.close()


def group_leader(env: dict[str, str], mark: Path) -> subprocess.Popen[bytes]:
    """A process group of the user's, leader included; ready once `mark` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(mark)!r}).touch(); time.sleep(60)"],
        env={**os.environ, **env}, start_new_session=True,
    )
    wait_for(mark.exists, what="the group to start")
    return proc


def begin(store: Store, run_dir: Path, pgid: int | None, leader_start: int | None) -> int:
    log = run_dir / "exp" / "train" / "attempt-1.log"
    attempt_id = store.begin_attempt("train", 1, None, "n", (0,), str(log), None, 0.0)
    if pgid is not None:
        store.attempt_launched(attempt_id, pgid, leader_start=leader_start)
    return attempt_id


def test_a_reused_pgid_is_never_adopted_nor_killed(run, tmp_path: Path) -> None:
    store, exps, run_dir = run
    # Another run of the user's with the same experiment name now holds the recorded pgid.
    other = group_leader({"GPUPACK_RUN_DIR": "/elsewhere", "GPUPACK_EXPERIMENT": "train", "GPUPACK_ATTEMPT": "1"},
                         tmp_path / "other")
    try:
        real_start = procs.start_time(other.pid)
        assert real_start is not None
        begin(store, run_dir, other.pid, real_start - 7)  # our leader started at another time
        found = recovery.recover(store, exps, 1.0)
        assert [(f.kind, f.handle) for f in found] == [("interrupt", None)]
        assert store.attempts("train")[0].state == A_INTERRUPTED

        # An adopted handle rechecks on every poll and before its kill.
        handle = Handle("train", other.pid, tmp_path / "x.exit", tmp_path / "x.log", leader_start=real_start - 7)
        assert handle.poll() == (True, None)
        handle.kill()
        assert other.poll() is None and alive(other.pid)
        mine = Handle("train", other.pid, tmp_path / "x.exit", tmp_path / "x.log", leader_start=real_start)
        assert mine.poll() == (False, None)
    finally:
        other.kill()
        other.wait()


def test_an_attempt_without_a_recorded_pgid_is_found_by_its_identity(run, tmp_path: Path) -> None:
    store, exps, run_dir = run
    begin(store, run_dir, None, None)  # the scheduler died before recording the group
    ident = {"GPUPACK_RUN_DIR": str(run_dir), "GPUPACK_EXPERIMENT": "train", "GPUPACK_ATTEMPT": "1"}
    survivor = group_leader(ident, tmp_path / "survivor")
    try:
        found = recovery.recover(store, exps, 1.0)
        assert [f.kind for f in found] == ["info"], [f.message for f in found]
        handle = found[0].handle
        assert handle is not None and handle.pgid == survivor.pid
        assert handle.leader_start == procs.start_time(survivor.pid)
        assert handle.poll() == (False, None)
        handle.kill()
        survivor.wait(10)
        assert handle.poll() == (True, None)
    finally:
        survivor.kill()
        survivor.wait()


def test_an_old_run_directory_without_start_times_still_needs_the_identity(run, tmp_path: Path) -> None:
    store, exps, run_dir = run
    stranger = group_leader({}, tmp_path / "stranger")
    try:
        begin(store, run_dir, stranger.pid, None)
        assert [f.kind for f in recovery.recover(store, exps, 1.0)] == ["interrupt"]
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_launched_group_has_its_start_time_stored_and_its_command_is_the_wrapper_child(write_manifest, tmp_path: Path) -> None:
    """launch.py: the leader's start time is read once the launch is over and stored a tick later;
    the command runs as the wrapper's one child, with no pid file."""
    path = write_manifest(MANIFEST.replace("sleep 60", "touch {out}/started; sleep 60"))
    proc = start_gpupack("run", str(path), "--poll", "0.2", env=gpupack_env(GPUPACK_GPUS="1x80GB"))
    run_dir = tmp_path / "runs" / "r"
    try:
        wait_for((run_dir / "exp" / "train" / "started").exists, what="the experiment to start")
        db = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)

        def stored() -> tuple[int, int | None]:
            return db.execute("SELECT pgid, leader_start FROM attempts WHERE experiment = 'train'").fetchone()

        wait_for(lambda: stored()[1] is not None, what="the start time in the store")
        pgid, leader_start = stored()
        assert leader_start == procs.start_time(pgid)
        [command] = procs.children(pgid)
        assert procs.identity(command) == procs.Identity(str(run_dir), "train", "1")
        assert procs.cmdline(command)[:1] == ["sleep"]  # bash exec'd the last command: the pid is its
        assert not list((run_dir / "exp" / "train").glob(".attempt-1.cmd"))
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
