"""The state database's write discipline: batches are all-or-nothing, a rerun of an unchanged
manifest rewrites nothing, a readers' view of a batch is the whole of it or none of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpupack.store import FAILED, PENDING, SKIPPED, ExperimentRow, Store

SPEC = {"gpus": 1, "mem_bytes": 10**9, "time_s": 60.0}


def row(name: str, ord_: int, fingerprint: str = "f", phase: str = "p") -> ExperimentRow:
    return ExperimentRow(name, phase, "t{i}", ord_, fingerprint, PENDING, None, SPEC, {"i": ord_}, True)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state.db")
    s.sync_experiments([row(f"t{i}", i) for i in range(5)])
    return s


def test_a_batch_lands_whole_and_a_failed_batch_leaves_nothing(store: Store, tmp_path: Path) -> None:
    reader = Store(tmp_path / "state.db", readonly=True)
    with store.batch():
        store.set_state("t0", FAILED, "exit 1")
        store.event("fail", "t0", "t0 failed", 1.0)
        # Not committed yet: another process sees none of it.
        assert reader.experiment_states()["t0"] == PENDING and reader.last_event_id(before=2.0) == 0
    assert reader.experiment_states()["t0"] == FAILED and reader.last_event_id(before=2.0) > 0

    with pytest.raises(RuntimeError), store.batch():
        store.set_states({"t1": (SKIPPED, "dependency failed"), "t2": (SKIPPED, "dependency failed")})
        store.event("skip", "t1", "t1 skipped", 3.0)
        raise RuntimeError("the scheduler dies mid-batch")
    assert reader.experiment_states() == {"t0": FAILED, "t1": PENDING, "t2": PENDING, "t3": PENDING, "t4": PENDING}
    assert [e.experiment for e in reader.events()] == ["t0"]
    reader.close()


def test_resyncing_an_unchanged_manifest_writes_nothing(store: Store) -> None:
    rows = [row(f"t{i}", i) for i in range(5)]
    store.set_state("t3", FAILED, "exit 1")
    before = store._db.total_changes
    assert store.sync_experiments(rows) == {}
    assert store._db.total_changes == before  # no row rewritten for 10,000 unchanged experiments
    assert store.experiment_states()["t3"] == FAILED


def test_resync_marks_changed_commands_and_keeps_dropped_experiments(store: Store) -> None:
    rows = [row("t0", 0, fingerprint="g"), row("t1", 1, phase="q"), row("t2", 2)]  # t3, t4 dropped
    store.set_state("t0", FAILED, "exit 1")
    assert store.sync_experiments(rows) == {"t0": "changed"}
    kept = {r.name: r for r in store.experiments()}
    assert kept["t0"].state == PENDING and kept["t0"].reason == "command, env or workdir changed"
    assert kept["t1"].phase == "q" and kept["t1"].in_manifest
    assert not kept["t3"].in_manifest and not kept["t4"].in_manifest  # history kept, flagged out
    assert list(store.experiment_states()) == ["t0", "t1", "t2"]
    store.sync_experiments([row(f"t{i}", i) for i in range(5)])  # back in the manifest
    assert store.experiments()[4].in_manifest


def test_an_older_schema_is_migrated_and_a_newer_one_refused_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    from gpupack.store import SCHEMA_VERSION, StoreError

    # A run directory of schema 1: attempts without leader_start.
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL,
            number INTEGER NOT NULL, run_id INTEGER, state TEXT NOT NULL, started_at REAL NOT NULL,
            ended_at REAL, exit_code INTEGER, node TEXT NOT NULL DEFAULT '', gpus TEXT NOT NULL DEFAULT '',
            pgid INTEGER, log_path TEXT NOT NULL, budget_bytes INTEGER, peak_bytes INTEGER, mean_util REAL,
            oom INTEGER NOT NULL DEFAULT 0, note TEXT, UNIQUE (experiment, number));
        INSERT INTO attempts (experiment, number, state, started_at, pgid, log_path) VALUES ('a', 1, 'running', 1.0, 4242, 'x.log');
        CREATE TABLE gpu_samples (t REAL NOT NULL, node TEXT NOT NULL, gpu INTEGER NOT NULL, util REAL,
            used_bytes INTEGER, total_bytes INTEGER);
        INSERT INTO gpu_samples VALUES (1.0, 'n', 0, 50.0, 10, 80);
    """)
    db.commit()
    db.close()
    assert Store(old, readonly=True).attempts()[0].pgid == 4242  # a reader reads it as it is
    store = Store(old)
    assert store.meta()["schema"] == str(SCHEMA_VERSION)
    assert store.leader_starts([1]) == {1: None}
    store.attempt_launched(1, 4243, leader_start=99)
    assert store.leader_starts([1]) == {1: 99}
    assert store.gpu_usage() == {("n", 0): (50.0, 10)}  # a sample of schema 1 stands for one
    store.close()

    newer = tmp_path / "newer.db"
    Store(newer).set_meta({"schema": str(SCHEMA_VERSION + 1)})
    for readonly in (False, True):
        with pytest.raises(StoreError) as err:
            Store(newer, readonly=readonly)
        assert str(err.value) == (
            f"{newer}: written by another gpupack (schema {SCHEMA_VERSION + 1}; this one knows 1 to {SCHEMA_VERSION}):"
            " run it with that version, or upgrade gpupack"
        )


def test_status_of_a_run_directory_from_a_newer_gpupack_exits_2_in_one_line(tmp_path: Path, capsys) -> None:
    from gpupack.cli import main
    from gpupack.store import SCHEMA_VERSION

    Store(tmp_path / "state.db").set_meta({"schema": str(SCHEMA_VERSION + 1)})
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"schema {SCHEMA_VERSION + 1}" in err[0] and "upgrade gpupack" in err[0], err


def test_the_aggregate_reads_agree_with_the_rows(store: Store) -> None:
    """status_rows, phase_state_counts and change_mark answer from SQL what full rows would."""
    from gpupack.store import A_FAILED, A_SUCCEEDED, SUCCEEDED

    store.sync_experiments([row("t0", 0), row("t1", 1), row("t2", 2, phase="q"), row("t3", 3, phase="q")])  # t4 left the manifest
    mark = store.change_mark()
    first = store.begin_attempt("t1", 1, None, "n1", [0], "a.log", None, 10.0)
    store.end_attempt(first, A_FAILED, 1, 20.0, FAILED, "exit code 1")
    assert store.change_mark() != mark
    second = store.begin_attempt("t1", 2, None, "n1", [2, 3], "b.log", None, 30.0)
    store.end_attempt(second, A_SUCCEEDED, 0, 45.0, SUCCEEDED)
    rows = {r[0]: r for r in store.status_rows()}
    assert list(rows) == ["t0", "t1", "t2", "t3"]
    assert rows["t0"] == ("t0", "p", PENDING, None, 0, None, None, None, None, None)
    assert rows["t1"] == ("t1", "p", SUCCEEDED, None, 2, (2, 3), "n1", 30.0, 45.0, 0)  # the latest attempt
    assert store.phase_state_counts() == [("p", PENDING, 1), ("p", SUCCEEDED, 1), ("q", PENDING, 2)]
    left = store.experiments(states=[PENDING], params=False)
    assert [e.name for e in left if e.in_manifest] == ["t0", "t2", "t3"] and all(e.params == {} for e in left)
    mark = store.change_mark()
    assert store.change_mark() == mark  # nothing changed, nothing to redraw


def test_history_stays_bounded_over_a_long_run_and_keeps_its_figures(tmp_path: Path) -> None:
    """Two days of 5-second samples of 2 GPUs and 30,000 events: old samples merged into buckets
    (mean utilization and peak memory unchanged), only the latest MAX_EVENTS events kept."""
    import json

    from gpupack.store import MAX_EVENTS, SAMPLE_TIERS

    store = Store(tmp_path / "state.db")
    day = 86400.0
    now = 2 * day
    times = [i * 5.0 for i in range(int(now / 5))]
    with store.batch():
        for t in times:
            # gpu0 busy 100% in the first hour of every 2, idle otherwise; gpu1 always 50%
            util0 = 100.0 if (t // 3600) % 2 == 0 else 0.0
            store.add_gpu_samples(t, [("n", 0, util0, int(t), 80), ("n", 1, 50.0, 7, 80)])
    before = store.gpu_usage()
    rows_before = len(store.gpu_samples())
    with store.batch():
        for i in range(30_000):
            store.event("start" if i % 3 else "finish", None, f"event {i}", float(i))
    store.compact(now)
    rows_after = len(store.gpu_samples())
    # per GPU: 1 h raw (720) + 23 h of 1-minute buckets (1,380) + 24 h of 15-minute ones (96)
    assert rows_before == 2 * len(times) and rows_after <= 2 * (720 + 1380 + 96) + 4
    after = store.gpu_usage()
    assert after[("n", 1)] == (50.0, 7)
    assert abs(after[("n", 0)][0] - before[("n", 0)][0]) < 1e-6 and after[("n", 0)][1] == before[("n", 0)][1]
    recent = [s for s in store.gpu_samples() if s[0] >= now - SAMPLE_TIERS[0][0]]
    assert len(recent) == 2 * 720  # the last hour is kept as read
    events = store.events()
    assert len(events) == MAX_EVENTS and events[-1].message == "event 29999"
    assert json.loads(store.meta()["events_dropped"]) == {"finish": 3334, "start": 6666}
    store.compact(now)  # nothing more to do: nothing changes
    assert len(store.gpu_samples()) == rows_after and len(store.events()) == MAX_EVENTS
