"""Environment faults and the safety of the run directory: each test does the damage for real."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import RECORD, ROOT, alive, by_name, gpupack, gpupack_env, started, wait_for

ENV = gpupack_env(GPUPACK_GPUS="2x80GB")


def run(manifest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return gpupack("run", str(manifest), "--poll", "1", "--no-report", *extra, env=ENV)


def test_run_directory_not_writable(write_manifest, tmp_path):
    (tmp_path / "blocker").write_text("a file where the runs directory should be\n")
    m = write_manifest("""
        name: nowrite
        runs_dir: blocker
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 1GB}
        """)
    done = run(m)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocker" in lines[0] and "cannot create the run directory" in lines[0]


def test_command_that_does_not_exist(write_manifest, tmp_path):
    m = write_manifest("""
        name: nocmd
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "no-such-command-gpupack --flag", mem: 1GB}
        """)
    done = run(m)
    assert done.returncode == 1
    row = by_name(tmp_path / "runs" / "nocmd")["a"]
    assert row["state"] == "failed" and row["exit_code"] == 127
    assert "command not found" in row["reason"]


def test_children_left_behind_are_killed_with_the_group(write_manifest, tmp_path):
    pidfile = tmp_path / "orphan.pid"
    m = write_manifest(f"""
        name: orphan
        phases:
          - name: p
            experiments:
              - name: forker
                cmd: (sleep 300 & echo $! > {pidfile}); echo parent exits
                mem: 1GB
        """)
    done = run(m)
    assert done.returncode == 0, done.stdout + done.stderr
    orphan = int(pidfile.read_text())
    wait_for(lambda: not alive(orphan), timeout=5, what="the orphan to die")


def test_state_db_locked_by_another_process_is_waited_for(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: locked
        phases:
          - name: p
            experiments:
              - {{name: a, cmd: "{RECORD} 0", mem: 1GB}}
        """)
    assert run(m).returncode == 0
    run_dir = tmp_path / "runs" / "locked"
    gpupack("reset", str(run_dir), env=ENV)
    # Another process (here: a sqlite3 connection in this test) holds the write lock for a while.
    holder = sqlite3.connect(run_dir / "state.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    proc = subprocess.Popen(
        [os.sys.executable, "-m", "gpupack", "run", str(m), "--poll", "1", "--no-report"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    db = (run_dir / "state.db").resolve()

    def waiting_on_the_lock() -> bool:
        """gpupack has the database open and sleeps (SQLite's busy handler), or has exited."""
        if proc.poll() is not None:
            return True
        try:
            opened = any(os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(db) for fd in os.listdir(f"/proc/{proc.pid}/fd"))
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                sleeping = f.read().rsplit(b")", 1)[-1].split()[0] == b"S"
        except OSError:
            return False
        return opened and sleeping

    wait_for(waiting_on_the_lock, timeout=60, what="gpupack to reach the locked database")
    assert proc.poll() is None, proc.communicate()  # it waits for the lock instead of giving up
    assert by_name(run_dir)["a"]["attempts"] == 1  # and wrote nothing meanwhile
    holder.execute("COMMIT")
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + err
    assert by_name(run_dir)["a"]["attempts"] == 2
    holder.close()


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a small tmpfs in CI: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing_a_log(write_manifest, tmp_path, tiny_disk):
    m = write_manifest(f"""
        name: full
        runs_dir: {tiny_disk}
        phases:
          - name: p
            experiments:
              - name: chatty
                cmd: head -c 5000000 /dev/zero | tr '\\0' x; echo
                mem: 1GB
              - name: quiet
                cmd: "{RECORD} 0"
                mem: 1GB
                depends_on: [chatty]
        """)
    done = run(m)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode in (1, 2), done.stdout + done.stderr
    run_dir = tiny_disk / "full"
    # Whatever happened, what was recorded is consistent and readable...
    db = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    # ...and once space is freed, the run completes without losing anything.
    for log in (run_dir / "exp" / "chatty").glob("attempt-*.log"):
        log.unlink()
    m.write_text(m.read_text().replace("head -c 5000000", "head -c 1000"))
    done = run(m)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = by_name(run_dir)
    assert rows["chatty"]["state"] == rows["quiet"]["state"] == "succeeded"


def test_values_from_results_and_state_never_reach_a_shell(write_manifest, tmp_path):
    canary = tmp_path / "pwned"
    evil = f"$(touch {canary}); touch {canary}; `touch {canary}`"
    m = write_manifest(f"""
        name: evil
        phases:
          - name: p
            experiments:
              - name: "e{{seed}}"
                grid: {{seed: [1, 2]}}
                cmd: python3 {ROOT}/tests/bin/write_results.py '{evil}'
                mem: 1GB
        """)
    done = gpupack("run", str(m), "--poll", "1", env=ENV)  # with the report
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "evil"
    assert json.loads((run_dir / "exp" / "e1" / "results.json").read_text())["note"] == evil
    for args in (("status", str(run_dir)), ("status", str(run_dir), "--json"), ("report", str(run_dir)),
                 ("results", str(run_dir)), ("results", str(run_dir), "--format", "csv")):
        assert gpupack(*args, env=ENV).returncode == 0
    assert not canary.exists()


def test_reset_never_follows_a_symlink_out_of_the_run_directory(write_manifest, tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("keep me\n")
    m = write_manifest("""
        name: links
        phases:
          - name: p
            experiments:
              - {name: a, cmd: "true", mem: 1GB}
        """)
    assert run(m).returncode == 0
    run_dir = tmp_path / "runs" / "links"
    (run_dir / "exp" / "a" / "escape").symlink_to(outside)
    assert gpupack("reset", str(run_dir), env=ENV).returncode == 0
    assert (outside / "data.txt").read_text() == "keep me\n"
    assert by_name(run_dir)["a"]["state"] == "pending"


def test_reset_refused_while_a_run_is_alive(write_manifest, tmp_path):
    m = write_manifest(f"""
        name: alive
        phases:
          - name: p
            experiments:
              - {{name: a, cmd: "{RECORD} 60", mem: 1GB}}
        """)
    run_dir = tmp_path / "runs" / "alive"
    proc = subprocess.Popen([os.sys.executable, "-m", "gpupack", "run", str(m), "--grace", "2", "--no-report"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: started(run_dir, "a").exists(), what="start")
        done = gpupack("reset", str(run_dir), env=ENV)
        assert done.returncode == 2 and "another gpupack run" in done.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
