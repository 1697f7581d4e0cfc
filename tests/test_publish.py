"""The published files (publish.py) and how readers choose what to read (reader.py), on the
shared fixture run: heartbeat, events log, snapshot or database, read-only run directories."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from gpupack import dashboard, publish, reader
from gpupack.store import Store
from conftest import ROOT, gpupack_env
from test_report import NOW, make_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "demo")


def _publish(run_dir: Path, now: float = NOW, close: int | None = None) -> dict:
    store = Store(run_dir / "state.db")
    pub = publish.Publisher(run_dir, store, poll_s=1.0, job_id="4242")
    pub.tick(now, force=True)
    if close is not None:
        pub.close(close, now)
    store.close()
    return json.loads((run_dir / "status.json").read_text())


def _as_other_host(run_dir: Path, written_at: float, **extra: object) -> None:
    """Make status.json look written by a scheduler on another host at `written_at`."""
    doc = json.loads((run_dir / "status.json").read_text())
    doc["heartbeat"].update({"host": "compute-7", "pid": 1, "written_at": written_at, **extra})
    (run_dir / "status.json").write_text(json.dumps(doc))


def test_status_json_carries_heartbeat_status_and_view(run_dir: Path) -> None:
    doc = _publish(run_dir)
    hb = doc["heartbeat"]
    assert hb["host"] == socket.gethostname() and hb["pid"] == os.getpid() and hb["job_id"] == "4242"
    assert hb["interval_s"] == 1.0 and abs(hb["written_at"] - time.time()) < 60
    assert Path(hb["db"]) == (run_dir / "state.db").resolve()
    assert doc["ended"] is None
    states = {e["name"]: e["state"] for e in doc["status"]["experiments"]}
    assert states["probe-l1"] == "running" and states["lat-b8"] == "failed"
    view = publish.view_from_json(doc["view"])
    assert view.run == "demo" and [g.label for g in view.gpus] == ["gpu0", "gpu1"]
    assert [o.name for o in view.gpus[1].occupants] == ["probe-l1"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".status.json.")]  # no temporary left


def test_events_log_is_appended_once_and_survives_a_torn_line(run_dir: Path) -> None:
    _publish(run_dir)
    log = run_dir / "events.log"
    first, offset = publish.read_events(log, 0)
    assert len(first) == 15 and [e.id for e in first] == sorted({e.id for e in first})
    with log.open("ab") as f:
        f.write(b'{"id": 999, "t": 1.0, "ki')  # a writer killed mid-line
    assert publish.read_events(log, offset) == ([], offset)  # the torn tail waits
    store = Store(run_dir / "state.db")
    store.event("info", None, "after the restart", NOW + 1)
    pub = publish.Publisher(run_dir, store, poll_s=1.0, job_id=None)  # a restarted scheduler
    pub.tick(NOW + 1, force=True)
    pub.tick(NOW + 2, force=True)  # nothing new: nothing appended twice
    store.close()
    later, _ = publish.read_events(log, offset)
    assert [e.message for e in later] == ["after the restart"]  # the torn fragment is skipped


def test_a_new_database_starts_a_new_events_log(run_dir: Path, tmp_path: Path) -> None:
    _publish(run_dir)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copyfile(run_dir / "events.log", fresh / "events.log")  # state.db deleted, the log left
    store = Store(fresh / "state.db")
    store.event("info", None, "first of the new database", NOW)
    publish.Publisher(fresh, store, poll_s=1.0, job_id=None).tick(NOW, force=True)
    store.close()
    assert [e.message for e in publish.read_events(fresh / "events.log", 0)[0]] == ["first of the new database"]
    assert len(publish.read_events(fresh / "events.log.old", 0)[0]) == 15


def test_a_snapshot_of_another_format_is_not_read(run_dir: Path) -> None:
    _publish(run_dir)
    _as_other_host(run_dir, time.time())
    doc = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**doc, "view": {"run": "x"}}))  # another version's
    assert reader.read_status_file(run_dir) is None
    source = reader.open_run(run_dir)
    assert source.source == "database"
    source.close()


def test_a_live_writer_on_another_host_is_read_from_the_snapshot(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _publish(run_dir)
    now = time.time()
    _as_other_host(run_dir, now - 2)

    def no_database(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reader on another host opened the database")

    monkeypatch.setattr(reader.sqlite3, "connect", no_database)
    monkeypatch.setattr("gpupack.store_schema.sqlite3.connect", no_database)
    source = reader.open_run(run_dir, now)
    assert source.source == "snapshot"
    assert source.poll(now) is None
    assert {e["name"]: e["state"] for e in source.status()["experiments"]}["probe-l1"] == "running"
    assert source.writer_line(now) == "scheduler (pid 1 on compute-7, job 4242) alive, last heartbeat 2s ago"
    buf = io.StringIO()
    board = dashboard.Dashboard(source, run_dir, Console(file=buf, force_terminal=False, width=140), live=False)
    board.start(now)
    text = buf.getvalue()
    assert text.count("started on gpu") == 8 and "gpu1 |" in text and "probe-l1 (10.0 GB/20.0 GB)" in text
    # Its heartbeat grows stale: gone, with the limit in the line.
    _as_other_host(run_dir, now - 60)
    assert source.poll(now) == "the scheduler (pid 1 on compute-7, job 4242) is gone: no heartbeat for 1m00s (limit 10s)"


def test_a_stale_writer_elsewhere_means_the_database_and_watch_ends(run_dir: Path) -> None:
    _publish(run_dir)
    _as_other_host(run_dir, time.time() - 300)
    source = reader.open_run(run_dir)
    assert source.source == "database"
    source.close()
    # The database shows a run that never recorded its end; only the heartbeat tells it is over.
    store = Store(run_dir / "state.db")
    store.begin_run(1, "compute-7", "4242", "", NOW + 10)
    store.close()
    buf = io.StringIO()
    assert reader.watch(run_dir, Console(file=buf, force_terminal=False, width=200), interval_s=0.01) == 0
    assert buf.getvalue().rstrip().splitlines()[-1].startswith("the scheduler (pid 1 on compute-7, job 4242) is gone: no heartbeat for 5m")


def test_the_last_snapshot_says_the_run_ended(run_dir: Path) -> None:
    doc = _publish(run_dir, close=1)
    assert doc["ended"]["exit_code"] == 1
    _as_other_host(run_dir, time.time())
    source = reader.open_run(run_dir)
    assert source.source == "database"  # nobody writes any more
    # The database's last run (another host's, the fixture's) recorded no end, and the heartbeat
    # is another run's: nobody will ever change what this reader shows, so a watch ends.
    assert source.poll(time.time()) == (
        "no scheduler is alive: the last one (pid 4000000 on elsewhere) recorded no end and no heartbeat"
    )
    source.close()
    # A scheduler starts while a reader holds the frozen database: the reader says so.
    source = reader.open_run(run_dir)
    doc = json.loads((run_dir / "status.json").read_text())
    doc["ended"] = None
    (run_dir / "status.json").write_text(json.dumps(doc))
    assert source.poll(time.time()) == "a new scheduler started (pid 1 on compute-7, job 4242): run `gpupack watch` again to follow it"
    source.close()


@pytest.fixture
def read_only(run_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """run_dir as a read-only bind mount (root ignores chmod), left as a killed scheduler leaves it:
    state.db with a -wal that holds commits, and no -shm."""
    store = Store(run_dir / "state.db")
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    store.event("info", None, "only in the WAL", NOW + 1)
    store.set_state("lat-b8", "succeeded")
    shutil.copyfile(run_dir / "state.db-wal", tmp_path / "wal")
    store.close()  # checkpoints and deletes the -wal: put back what a kill -9 would have left
    shutil.copyfile(tmp_path / "wal", run_dir / "state.db-wal")
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpupack", *args], capture_output=True, text=True, timeout=120,
                          env=gpupack_env(), cwd=ROOT)


def test_status_results_report_on_a_read_only_run_directory(read_only: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        (read_only / "probe").touch()
    done = _cli("status", str(read_only), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {e["name"]: e["state"] for e in data["experiments"]}["lat-b8"] == "succeeded"  # read through the -wal
    assert data["source"] == "database"
    done = _cli("results", str(read_only), "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = {(r["task"], r["metric"]): r for r in json.loads(done.stdout)}
    assert rows[("sst2", "accuracy")]["n"] == 3 and rows[("sst2", "accuracy")]["mean"] == pytest.approx(0.84)
    done = _cli("report", str(read_only))
    assert done.returncode == 2 and "--out" in done.stderr and "Traceback" not in done.stderr
    done = _cli("report", str(read_only), "--out", str(tmp_path / "elsewhere"))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "elsewhere" / "summary.json").read_text())
    assert {e["name"]: e["state"] for e in summary["experiments"]}["lat-b8"] == "succeeded"
    assert sorted(p.name for p in read_only.iterdir()) == sorted(["exp", "state.db", "state.db-wal"])


def test_a_killed_runs_wal_is_read_from_a_private_copy(read_only: Path, run_dir: Path) -> None:
    done = _cli("status", str(run_dir), "--json")  # the writable directory itself this time
    assert done.returncode == 0, done.stderr
    assert {e["name"]: e["state"] for e in json.loads(done.stdout)["experiments"]}["lat-b8"] == "succeeded"
    assert not Path(f"{run_dir / 'state.db'}-shm").exists()  # no shared WAL index made or touched



def test_a_wal_deleted_under_the_readers_copy_is_read_again(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed scheduler's -wal, and a new scheduler (a requeued job) that checkpoints and
    deletes it while `status` on the login node copies it: the reader takes its copy again."""
    store = Store(run_dir / "state.db")
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    store.set_state("lat-b8", "succeeded")  # only in the -wal for now
    real_copy = shutil.copyfile
    copies: list[str] = []

    def copy_while_a_scheduler_starts(src: str | Path, dst: str | Path) -> str | Path:
        if not copies:
            store.close()  # the new scheduler: checkpoints, deletes the -wal
        copies.append(Path(src).name)
        return real_copy(src, dst)

    monkeypatch.setattr(reader.shutil, "copyfile", copy_while_a_scheduler_starts)
    read = reader.open_file(run_dir / "state.db", writer_here=False)
    assert copies == ["state.db", "state.db-wal"]  # the first copy failed at the -wal ...
    assert read.experiment_states()["lat-b8"] == "succeeded"  # ... and the checkpointed database was read
    read.close()

def test_a_finished_run_is_read_immutable_without_side_files(run_dir: Path, tmp_path: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(run_dir), str(mount)], capture_output=True).returncode != 0:
        pytest.skip("no read-only bind mount here")
    try:
        done = _cli("status", str(mount))
        assert done.returncode == 0, done.stderr
        assert "succeeded 5" in done.stdout
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["exp", "state.db"]  # no -wal, no -shm created


def test_state_dir_restores_from_the_run_directory_unless_this_node_got_further(run_dir: Path, tmp_path: Path) -> None:
    from gpupack import statedir

    def messages(path: Path) -> list[str]:
        store = Store(path, readonly=True)
        try:
            return [e.message for e in store.events()]
        finally:
            store.close()

    local = tmp_path / "node-local"
    live = statedir.prepare(local, run_dir)
    assert live.parent == local and messages(live) == messages(run_dir / "state.db")
    store = Store(live)  # this node got further: a scheduler killed here after its last copy back
    store.event("info", None, "only on this node", NOW + 5)
    store.close()
    assert statedir.prepare(local, run_dir) == live
    assert messages(live)[-1] == "only on this node"
    store = Store(run_dir / "state.db")  # the run directory got further: a run on another node since
    store.begin_run(2, "compute-9", None, "", NOW + 10)
    store.event("info", None, "from another node", NOW + 11)
    store.close()
    statedir.prepare(local, run_dir)
    assert messages(live)[-1] == "from another node"
    assert not Path(f"{run_dir / 'state.db'}-wal").exists()  # never left beside the copies that replace it


def test_the_database_copy_is_whole_and_needs_no_wal(run_dir: Path, tmp_path: Path) -> None:
    store = Store(run_dir / "state.db")
    publish.copy_database(store, tmp_path / "copy.db", tmp_path)
    store.close()
    copy = Store(tmp_path / "copy.db", readonly=True, immutable=True)
    assert copy.integrity_ok() and len(copy.experiments()) == 9
    assert copy._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    copy.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "runs") == ["copy.db"]
