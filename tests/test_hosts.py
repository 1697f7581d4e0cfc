"""Two hosts over one run directory: the scheduler runs with another hostname (its own UTS
namespace, `unshare --uts`), as on a compute node, and readers run here, as on the login node.
Readers there must follow the run from the published files (never opening state.db), see a
killed scheduler gone within the documented limit, and a requeued job on another node must treat
the lost node's attempts as interrupted without signalling them.

This machine's kernel has no NFS (client or server), so both "hosts" share a local file system;
what differs is what gpupack can tell apart: the hostname."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from gpupack import reader
from gpupack.publish import gone_after_s, heartbeat_interval
from test_crash import DURATIONS, _manifest as storm_manifest
from conftest import RECORD, ROOT, alive, gpupack_env, seen, started, status, wait_for

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0,
    reason="needs `unshare --uts` (root, util-linux) to give the scheduler another hostname",
)

ENV = gpupack_env(GPUPACK_GPUS="4x80GB")
POLL_S = 0.5

# A reader that must not open any SQLite database: every connect fails the command loudly.
NO_DB = """
import sqlite3, sys
def refuse(*args, **kwargs):
    raise SystemExit(f"reader opened a database: {args}")
sqlite3.connect = refuse
from gpupack.cli import main
sys.exit(main(sys.argv[1:]))
"""


# A reader that may open only published copies of the database (immutable, replaced by rename).
ONLY_COPIES = """
import sqlite3, sys
real = sqlite3.connect
def guarded(database, *args, **kwargs):
    if "immutable=1" not in str(database):
        raise SystemExit(f"reader opened a live database: {database}")
    return real(database, *args, **kwargs)
sqlite3.connect = guarded
from gpupack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def on_host(host: str, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    """`gpupack ARGV` with hostname `host`. unshare and sh exec, so the pid is gpupack's."""
    return subprocess.Popen(
        ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", sys.executable, "-m", "gpupack", *argv],
        env=ENV, cwd=ROOT, text=True, **kwargs,
    )


def no_db_reader(*argv: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", NO_DB, *argv], env=ENV, cwd=ROOT, text=True, **kwargs)


def heartbeat(run_dir: Path) -> dict[str, Any] | None:
    doc = reader.read_status_file(run_dir)
    return doc.get("heartbeat") if doc else None


def wait_published(run_dir: Path, pid: int) -> None:
    wait_for(lambda: (heartbeat(run_dir) or {}).get("pid") == pid, timeout=60, what=f"the heartbeat of pid {pid}")


def test_a_reader_on_another_host_follows_the_run_from_the_snapshot(write_manifest, tmp_path: Path) -> None:
    m = write_manifest(f"""
        name: remote
        phases:
          - name: p
            experiments:
              - name: "e{{i}}"
                cmd: {RECORD} 1.5
                grid: {{i: [1, 2, 3, 4, 5, 6]}}
                mem: 50GB
        """)
    run_dir = tmp_path / "runs" / "remote"
    sched = on_host("compute-1", "run", str(m), "--poll", str(POLL_S), "--no-report", stdout=subprocess.DEVNULL)
    try:
        wait_published(run_dir, sched.pid)
        assert heartbeat(run_dir)["host"] == "compute-1"  # type: ignore[index]
        done = no_db_reader("status", str(run_dir), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = done.communicate(timeout=60)
        assert done.returncode == 0, err
        data = json.loads(out)
        assert data["source"] == "snapshot" and data["run"] == "remote"
        assert data["scheduler"].startswith(f"scheduler (pid {sched.pid} on compute-1) alive")
        wait_for((run_dir / "snapshot.db").exists, timeout=60, what="the first database copy")
        for args in (("results", str(run_dir)), ("report", str(run_dir), "--out", str(tmp_path / "report"))):
            done = subprocess.run([sys.executable, "-c", ONLY_COPIES, *args], env=ENV, cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr  # from snapshot.db, a minute behind at most
        assert json.loads((tmp_path / "report" / "summary.json").read_text())["experiments"]
        log = tmp_path / "watch.log"
        with log.open("w") as f:
            watch = no_db_reader("watch", str(run_dir), "--interval", "0.2", stdout=f, stderr=subprocess.STDOUT)
            assert watch.wait(timeout=120) == 0, log.read_text()
        assert sched.wait(timeout=60) == 0
        assert not (run_dir / "snapshot.db").exists()  # the run is over: state.db is whole again
    finally:
        if sched.poll() is None:
            sched.kill()
            sched.wait()
    text = log.read_text()
    assert "reader opened a database" not in text
    assert text.rstrip().splitlines()[-1] == "run ended (exit code 0)"
    for i in range(1, 7):  # it followed the run to its end: every experiment's end, once
        assert text.count(f" e{i} succeeded in ") == 1, text
    assert "| remote |" in text and "ended after" in text


def test_a_killed_scheduler_is_gone_for_a_reader_elsewhere_and_its_attempts_resume_on_another_node(
    write_manifest, tmp_path: Path
) -> None:
    m = write_manifest(f"""
        name: lost
        phases:
          - name: p
            experiments:
              - name: long
                cmd: {RECORD} 120 --resumed-seconds 0.2
                mem: 10GB
                resumable: true
        """)
    run_dir = tmp_path / "runs" / "lost"
    sched = on_host("compute-1", "run", str(m), "--poll", str(POLL_S), "--no-report", stdout=subprocess.DEVNULL)
    survivor = None
    try:
        wait_for(lambda: started(run_dir, "long").exists(), timeout=60, what="the experiment's start")
        survivor = json.loads(started(run_dir, "long").read_text())["pid"]
        wait_published(run_dir, sched.pid)
        log = tmp_path / "watch.log"
        with log.open("w") as f:
            watch = no_db_reader("watch", str(run_dir), "--interval", "0.2", stdout=f, stderr=subprocess.STDOUT)
            wait_for(lambda: "=== " in log.read_text(), timeout=60, what="the watch's first snapshot")
            sched.kill()  # kill -9: no end recorded, no last snapshot
            sched.wait()
            killed_at = time.monotonic()
            limit = gone_after_s(heartbeat_interval(POLL_S))
            # Within the limit after the last heartbeat (at most one interval before the kill),
            # plus one watch interval and the reader's start-up slack.
            assert watch.wait(timeout=limit + 15) == 0, log.read_text()
            assert time.monotonic() - killed_at <= limit + 15
        last = log.read_text().rstrip().splitlines()[-1]
        assert last.startswith(f"the scheduler (pid {sched.pid} on compute-1) is gone: no heartbeat for "), last
        assert last.endswith(f"(limit {int(limit)}s)")
        assert "reader opened a database" not in log.read_text()
        # Nobody writes any more: `status` reads the database, and says the scheduler is gone.
        done = subprocess.run([sys.executable, "-m", "gpupack", "status", str(run_dir), "--json"], env=ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["source"] == "database"
        assert data["scheduler"].startswith(f"the scheduler (pid {sched.pid} on compute-1) is gone: no heartbeat for ")
        # The requeued job starts on another node: attempt 1 there is lost, never signalled from
        # here (its pid means nothing on this node); it is recorded interrupted and resumes.
        assert alive(survivor)
        again = on_host("compute-2", "run", str(m), "--poll", str(POLL_S), "--no-report", stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0, out
        assert "long was lost with the previous scheduler on compute-1: it runs again" in out
        assert seen(run_dir, "long", 2)["resume"] == "1"
        assert alive(survivor)  # not signalled: in a real cluster Slurm ended it with the job
        rows = {e["name"]: e for e in status(run_dir)["experiments"]}
        assert rows["long"]["state"] == "succeeded" and rows["long"]["attempts"] == 2
    finally:
        if sched.poll() is None:
            sched.kill()
            sched.wait()
        if survivor is not None and alive(survivor):
            os.killpg(survivor, signal.SIGKILL) if _leads_group(survivor) else os.kill(survivor, signal.SIGKILL)


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def test_state_dir_keeps_the_live_database_on_the_node_and_the_run_directory_current(write_manifest, tmp_path: Path) -> None:
    from gpupack import statedir

    m = write_manifest(f"""
        name: local
        phases:
          - name: p
            experiments:
              - name: quick
                cmd: {RECORD} 0.1
                mem: 10GB
              - name: long
                cmd: {RECORD} 120 --resumed-seconds 0.2
                mem: 10GB
                resumable: true
        """)
    run_dir = tmp_path / "runs" / "local"
    node1, node2 = tmp_path / "node1-tmp", tmp_path / "node2-tmp"
    live = statedir.live_path(node1, run_dir)
    sched = on_host("compute-1", "run", str(m), "--poll", str(POLL_S), "--no-report", "--state-dir", str(node1),
                    stdout=subprocess.DEVNULL)
    survivor = None
    try:
        wait_for(lambda: started(run_dir, "long").exists(), timeout=60, what="the experiment's start")
        survivor = json.loads(started(run_dir, "long").read_text())["pid"]
        wait_published(run_dir, sched.pid)
        assert heartbeat(run_dir)["db"] == str(live.resolve())  # type: ignore[index]
        assert Path(f"{live}-wal").exists()  # the live database: WAL, on the node

        def copied_states() -> dict[str, str]:
            if not (run_dir / "state.db").exists():
                return {}
            with closing(sqlite3.connect(f"file:{run_dir / 'state.db'}?immutable=1", uri=True)) as db:
                return dict(db.execute("SELECT name, state FROM experiments"))

        # The run directory's copy follows the run tick by tick; it is read immutable, never as WAL.
        wait_for(lambda: copied_states() == {"quick": "succeeded", "long": "running"}, timeout=60, what="the copy")
        done = subprocess.run([sys.executable, "-c", ONLY_COPIES, "results", str(run_dir)], env=ENV, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert not (run_dir / "state.db-wal").exists() and not (run_dir / "snapshot.db").exists()
        sched.kill()  # kill -9 on node 1; the requeued job starts on node 2, with its own local disk
        sched.wait()
        again = on_host("compute-2", "run", str(m), "--poll", str(POLL_S), "--no-report", "--state-dir", str(node2),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0, out
        assert "long was lost with the previous scheduler on compute-1: it runs again" in out
        assert "quick" not in out.split("run started", 1)[1].split("\n", 1)[1]  # skipped, not run again
        assert seen(run_dir, "long", 2)["resume"] == "1"
    finally:
        if sched.poll() is None:
            sched.kill()
            sched.wait()
        if survivor is not None and alive(survivor):
            os.kill(survivor, signal.SIGKILL)
    assert not statedir.live_path(node2, run_dir).exists()  # copied back at the end, then removed
    db = sqlite3.connect(f"file:{run_dir / 'state.db'}?immutable=1", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert dict(db.execute("SELECT name, state FROM experiments")) == {"quick": "succeeded", "long": "succeeded"}
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


# --- 20 kill -9 of a scheduler while a reader on the other "host" polls ----------------------

def _observations_hold(observed: list[tuple[int, dict[str, Any]]], final: dict[str, list[dict[str, Any]]]) -> None:
    """Every status the reader saw was true of the database at some moment: each attempt it
    shows exists with the same start, an ended one with the same end, exit code and outcome, and
    no experiment's attempts, nor (between resets) the number succeeded, ever went backwards."""
    last_attempts: dict[str, int] = {}
    last_done = (0, 0)
    for epoch, data in observed:
        done = 0
        for e in data["experiments"]:
            k = e["attempts"]
            assert k >= last_attempts.get(e["name"], 0), (e, last_attempts)
            last_attempts[e["name"]] = k
            attempts = final[e["name"]]
            assert k <= len(attempts), e
            if k == 0:
                assert e["state"] == "pending" and e["started_at"] is None, e
                continue
            a = attempts[k - 1]
            assert a["started_at"] == e["started_at"], (e, a)
            if e["ended_at"] is not None:
                assert (a["ended_at"], a["exit_code"]) == (e["ended_at"], e["exit_code"]), (e, a)
                assert a["state"] == e["state"] or e["state"] == "pending", (e, a)  # pending: reset
            else:
                assert e["state"] == "running", e
            done += e["state"] == "succeeded"
        assert (epoch, done) >= last_done, (epoch, done, last_done)
        last_done = (epoch, done)


def test_twenty_kills_never_show_a_reader_elsewhere_a_state_that_was_not(tmp_path: Path) -> None:
    m = storm_manifest(tmp_path)  # 24 experiments of 0.3-1.45 s, 8 at a time
    run_dir = tmp_path / "runs" / "storm"
    observed: list[tuple[int, dict[str, Any]]] = []
    sources: list[str] = []
    errors: list[BaseException] = []
    epoch = [0]  # bumped by a reset, when the plan finishes before the 20th kill
    resetting = threading.Lock()  # a read is of one epoch: never across a reset
    stop = threading.Event()

    def poll() -> None:  # the login node's `status`, again and again
        while not stop.wait(0.02):
            try:
                with resetting:
                    source = reader.open_run(run_dir)
                    try:
                        observed.append((epoch[0], source.status()))
                        sources.append(source.source)
                    finally:
                        source.close()
            except BaseException as exc:  # noqa: BLE001  the test's point: nothing may escape
                errors.append(exc)
                return

    rng = random.Random(14)
    kills = 0
    thread = threading.Thread(target=poll, daemon=True)
    try:
        while kills < 20:
            sched = on_host("compute-1", "run", str(m), "--poll", "0.3", "--no-report", stdout=subprocess.DEVNULL)
            wait_published(run_dir, sched.pid)
            if thread.ident is None:  # started once; one that stopped has its error in `errors`
                thread.start()
            try:
                sched.wait(timeout=rng.uniform(0.0, 0.6))
            except subprocess.TimeoutExpired:
                sched.kill()
                sched.wait()
                kills += 1
                continue
            if sched.returncode == 0:  # all done before the 20th kill: again, from the start
                with resetting:
                    reset = subprocess.run([sys.executable, "-m", "gpupack", "reset", str(run_dir)], env=ENV, cwd=ROOT,
                                           capture_output=True, text=True, timeout=60)
                    assert reset.returncode == 0, reset.stderr
                    epoch[0] += 1
        last = on_host("compute-1", "run", str(m), "--poll", "0.3", "--no-report", stdout=subprocess.DEVNULL)
        assert last.wait(timeout=120) == 0
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    assert sources.count("snapshot") > 20, sources[:50]
    final: dict[str, list[dict[str, Any]]] = {f"job{s}": [] for s in DURATIONS}
    db = sqlite3.connect(run_dir / "state.db")
    for name, started_at, ended_at, exit_code, state in db.execute(
        "SELECT experiment, started_at, ended_at, exit_code, state FROM attempts ORDER BY id"
    ):
        final[name].append({"started_at": started_at, "ended_at": ended_at, "exit_code": exit_code, "state": state})
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(observed) > 50
    _observations_hold(observed, final)
    assert {e["state"] for e in status(run_dir)["experiments"]} == {"succeeded"}
    print(f"reader observations: {len(observed)} ({sources.count('snapshot')} from the snapshot), "
          f"kills: {kills}, resets: {epoch[0]}")
