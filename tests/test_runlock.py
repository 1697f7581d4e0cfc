"""The run lock (runlock.py): flock, and where the file system refuses flock (Lustre without
`-o flock`, NFS without a lock manager) the O_EXCL lock file with its heartbeat. This machine's
kernel serves no NFS (no nfsd, no nfs client), so the refusal is a test double for that one
syscall, fcntl.flock; the rest (files, O_EXCL, rename, processes, hostnames) is real."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupack import runlock
from gpupack.runlock import LockError, run_lock
from conftest import ROOT, gpupack_env, wait_for


def _no_flock(code: int = errno.ENOSYS):
    def flock(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    return flock


def test_flock_refuses_a_second_scheduler_in_one_line(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "flock"], env=gpupack_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError) as err:
            with run_lock(tmp_path):
                pass
        assert "\n" not in str(err.value)
        assert f"another gpupack run is using this run directory (pid {holder.pid} on {socket.gethostname()})" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # released by the kernel on kill -9
        pass


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP])
def test_without_flock_an_owner_file_holds_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    monkeypatch.setattr(runlock.fcntl, "flock", _no_flock(code))
    owner = tmp_path / "lock.owner"
    with run_lock(tmp_path, job_id="77"):
        data = json.loads(owner.read_text())
        assert (data["host"], data["pid"], data["job_id"]) == (socket.gethostname(), os.getpid(), "77")
        assert abs(data["heartbeat"] - time.time()) < 60
        with pytest.raises(LockError) as err:
            with run_lock(tmp_path):
                pass
        assert str(err.value) == (
            f"{tmp_path}: another gpupack run is using this run directory (pid {os.getpid()} on "
            f"{socket.gethostname()}, job 77, flock unavailable: lock.owner); wait for it to end or stop it first"
        )
    assert not owner.exists()  # released at the end


def _owner(path: Path, host: str, pid: int, age_s: float) -> None:
    (path / "lock.owner").write_text(json.dumps({"host": host, "pid": pid, "job_id": "1", "heartbeat": time.time() - age_s}))


def test_a_stale_owner_is_taken_over_only_when_it_is_really_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock.fcntl, "flock", _no_flock())
    stale = runlock.LOCK_STALE_S + 5
    _owner(tmp_path, "compute-3", 1, age_s=5)  # fresh, on another host: busy
    with pytest.raises(LockError, match="pid 1 on compute-3"):
        with run_lock(tmp_path):
            pass
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _owner(tmp_path, socket.gethostname(), sleeper.pid, age_s=stale)  # stale beat, but its pid lives here
        with pytest.raises(LockError, match=f"pid {sleeper.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    _owner(tmp_path, socket.gethostname(), sleeper.pid, age_s=stale)  # stale and its pid gone: taken
    with run_lock(tmp_path):
        assert json.loads((tmp_path / "lock.owner").read_text())["pid"] == os.getpid()
    _owner(tmp_path, "compute-3", 1, age_s=stale)  # stale on another host: taken
    with run_lock(tmp_path):
        assert json.loads((tmp_path / "lock.owner").read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]  # nothing left aside


def test_a_late_take_over_never_removes_the_fresh_lock_of_a_faster_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three schedulers judged the same lock stale: A took it over first; B takes over late, and C
    tries to create the lock at the worst moment, while B reads. A's lock must stand, alone."""
    path = tmp_path / "lock.owner"
    _owner(tmp_path, "compute-1", 1, age_s=runlock.LOCK_STALE_S + 5)
    judged = json.loads(path.read_text())
    a = {"host": "compute-2", "pid": 2, "job_id": "2", "heartbeat": time.time()}
    path.unlink()
    assert runlock._create(path, a)  # A, done taking over
    c = {"host": "compute-3", "pid": 3, "job_id": "3", "heartbeat": time.time()}
    created_by_c = []
    real_read = runlock._read

    def read_while_c_creates(p: Path) -> dict | None:
        created_by_c.append(runlock._create(path, c))
        return real_read(p)

    monkeypatch.setattr(runlock, "_read", read_while_c_creates)
    runlock._take_over(path, judged, time.time())  # B, late
    monkeypatch.setattr(runlock, "_read", real_read)
    b = {"host": "compute-4", "pid": 4, "job_id": "4", "heartbeat": time.time()}
    assert not runlock._create(path, b)
    assert created_by_c == [False] and json.loads(path.read_text()) == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock.owner"]


def test_an_empty_owner_file_waits_for_its_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock.fcntl, "flock", _no_flock())
    owner = tmp_path / "lock.owner"
    owner.touch()  # a holder killed between O_EXCL and its write
    with pytest.raises(LockError, match="being written"):
        with run_lock(tmp_path):
            pass
    old = time.time() - runlock.LOCK_STALE_S - 5
    os.utime(owner, (old, old))
    with run_lock(tmp_path):
        assert json.loads(owner.read_text())["pid"] == os.getpid()


def test_other_lock_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runlock.fcntl, "flock", _no_flock(errno.EIO))
    with pytest.raises(LockError) as err:
        with run_lock(tmp_path):
            pass
    assert str(err.value) == f"{tmp_path / 'lock'}: cannot lock it: {os.strerror(errno.EIO)}"
    with pytest.raises(LockError, match="cannot use the run directory"):
        with run_lock(tmp_path / "missing"):
            pass


# A scheduler's lock in its own process: prints "held", holds until killed.
HOLD = """
import errno, os, sys, time
from gpupack import runlock
if sys.argv[2] == "noflock":
    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    runlock.fcntl.flock = flock
try:
    with runlock.run_lock(sys.argv[1], job_id=os.environ.get("JOB")):
        print("held", flush=True)
        time.sleep(120)
except runlock.LockError as exc:
    print(exc, flush=True)
    sys.exit(2)
"""


def _on_host(host: str, *args: str) -> subprocess.Popen[str]:
    """A process whose hostname is `host` (its own UTS namespace), as on another node."""
    return subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", sys.executable, "-c", HOLD, *args],
        env=gpupack_env(JOB=host), cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )


@pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0,
    reason="needs `unshare --uts` (root, util-linux) for a second hostname",
)
def test_two_hosts_without_flock_never_both_hold_the_run(tmp_path: Path) -> None:
    a = _on_host("node-a", str(tmp_path), "noflock")
    try:
        assert a.stdout is not None and a.stdout.readline().strip() == "held"
        b = _on_host("node-b", str(tmp_path), "noflock")
        out, _ = b.communicate(timeout=60)
        assert b.returncode == 2, out
        assert out.strip() == (
            f"{tmp_path}: another gpupack run is using this run directory (pid {a.pid} on node-a, job node-a, "
            "flock unavailable: lock.owner); wait for it to end or stop it first"
        )
    finally:
        a.terminate()
        a.wait()
    # node-a was killed without releasing: its heartbeat must go stale before node-b may take it
    # over; age the file instead of waiting a minute.
    owner = tmp_path / "lock.owner"
    data = json.loads(owner.read_text())
    data["heartbeat"] -= runlock.LOCK_STALE_S + 1
    owner.write_text(json.dumps(data))
    b = _on_host("node-b", str(tmp_path), "noflock")
    try:
        assert b.stdout is not None and b.stdout.readline().strip() == "held"
        wait_for(lambda: json.loads(owner.read_text()).get("host") == "node-b", what="node-b's lock file")
    finally:
        b.kill()
        b.wait()


# `gpupack run` itself on a file system that refuses flock (the same one-syscall double).
RUN_NO_FLOCK = """
import errno, sys
from gpupack import runlock
def flock(fd, op):
    raise OSError(errno.ENOSYS, "Function not implemented")
runlock.fcntl.flock = flock
from gpupack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_gpupack_run_without_flock_holds_and_releases_the_owner_file(write_manifest, tmp_path: Path) -> None:
    from conftest import RECORD, started

    m = write_manifest(f"""
        name: lustre
        phases:
          - name: p
            experiments:
              - name: a
                cmd: {RECORD} 1
                mem: 10GB
        """)
    run_dir = tmp_path / "runs" / "lustre"
    env = gpupack_env(GPUPACK_GPUS="1x80GB")
    first = subprocess.Popen([sys.executable, "-c", RUN_NO_FLOCK, "run", str(m), "--poll", "0.2", "--no-report"],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: started(run_dir, "a").exists(), timeout=60, what="the first run's experiment")
        assert json.loads((run_dir / "lock.owner").read_text())["pid"] == first.pid
        second = subprocess.run([sys.executable, "-c", RUN_NO_FLOCK, "run", str(m), "--no-report"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"gpupack: error: {run_dir}: another gpupack run is using this run directory (pid {first.pid} on "
            f"{socket.gethostname()}, flock unavailable: lock.owner); wait for it to end or stop it first"
        ]
        out, _ = first.communicate(timeout=60)
        assert first.returncode == 0, out
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (run_dir / "lock.owner").exists()
