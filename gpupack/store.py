"""The run's state: one SQLite database (WAL) in the run directory, the only persistence.

Every state change is committed, with its event, before the engine acts on it (alone, or in
one `batch` with the other changes of the same moment), so a scheduler killed at any moment
leaves a database that says exactly what was launched (with its process group) and what ended. Readers (`status`, `watch`, `report`) open
it read-only while a run goes on.

Tables:
    experiments  name, phase, template, ord, fingerprint, state, reason, spec (JSON), params (JSON)
    attempts     experiment, number, run_id, state, started_at, ended_at, exit_code, node, gpus,
                 pgid, log_path, peak_bytes, mean_util, oom
    events       t, kind, experiment, message          (what the dashboard and job log show)
    gpu_samples  t, node, gpu, util, used_bytes, total_bytes
    runs         id, started_at, ended_at, pid, host, job_id, exit_code
"""

from __future__ import annotations

import json
import sqlite3
import time
from urllib.parse import quote
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The version of the tables below, kept in meta 'schema'. A writer migrates an older run
# directory (_MIGRATIONS[v] takes version v to v + 1) and refuses a newer one; so does a reader
# (it reads older versions as they are: it never asks for the newer columns).
SCHEMA_VERSION = 2
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE attempts ADD COLUMN leader_start INTEGER",
        "ALTER TABLE gpu_samples ADD COLUMN n INTEGER NOT NULL DEFAULT 1",
    ),
}

# Retention (Store.compact): GPU samples older than an age are merged per GPU into buckets (the
# mean utilization weighted by the samples merged, the peak memory), and only the latest
# MAX_EVENTS events are kept, with per-kind counts of the dropped ones in meta 'events_dropped'.
# A 24-hour run of 4 GPUs sampled every 5 s keeps ~8,000 sample rows instead of ~69,000.
SAMPLE_TIERS: tuple[tuple[float, float], ...] = ((3600.0, 60.0), (86400.0, 900.0))  # (older than, bucket) s
MAX_EVENTS = 20_000

# The states live in states.py; re-exported here for the store's many readers.
from .states import (  # noqa: E402
    A_FAILED as A_FAILED,
    A_INTERRUPTED as A_INTERRUPTED,
    A_LAUNCHING as A_LAUNCHING,
    A_RUNNING as A_RUNNING,
    A_SUCCEEDED as A_SUCCEEDED,
    FAILED as FAILED,
    INTERRUPTED as INTERRUPTED,
    PENDING as PENDING,
    RUNNING as RUNNING,
    SKIPPED as SKIPPED,
    STATES as STATES,
    SUCCEEDED as SUCCEEDED,
)

# meta key: JSON {"node:index": why} of the GPUs that take no new experiment now (the engine
# writes it when the set changes; the dashboards show the reason on the GPU's row).
UNAVAILABLE_META = "gpus_unavailable"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    phase TEXT NOT NULL,
    template TEXT NOT NULL,
    ord INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    spec TEXT NOT NULL DEFAULT '{}',
    params TEXT NOT NULL DEFAULT '{}',
    in_manifest INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment TEXT NOT NULL,
    number INTEGER NOT NULL,
    run_id INTEGER,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    exit_code INTEGER,
    node TEXT NOT NULL DEFAULT '',
    gpus TEXT NOT NULL DEFAULT '',
    pgid INTEGER,
    leader_start INTEGER,
    log_path TEXT NOT NULL,
    budget_bytes INTEGER,
    peak_bytes INTEGER,
    mean_util REAL,
    oom INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    UNIQUE (experiment, number)
);
CREATE INDEX IF NOT EXISTS attempts_by_experiment ON attempts (experiment, number);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    kind TEXT NOT NULL,
    experiment TEXT,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_samples (
    t REAL NOT NULL,
    node TEXT NOT NULL,
    gpu INTEGER NOT NULL,
    util REAL,
    used_bytes INTEGER,
    total_bytes INTEGER,
    n INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS gpu_samples_by_t ON gpu_samples (t);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    ended_at REAL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    job_id TEXT,
    exit_code INTEGER,
    gpus TEXT
);
"""


class StoreError(Exception):
    """The run directory's database cannot be used (locked, corrupt, not writable)."""


@dataclass(frozen=True)
class ExperimentRow:
    name: str
    phase: str
    template: str
    ord: int
    fingerprint: str
    state: str
    reason: str | None
    spec: Mapping[str, object]
    params: Mapping[str, object]
    in_manifest: bool


@dataclass(frozen=True)
class AttemptRow:
    id: int
    experiment: str
    number: int
    run_id: int | None
    state: str
    started_at: float
    ended_at: float | None
    exit_code: int | None
    node: str
    gpus: tuple[int, ...]
    pgid: int | None
    log_path: str
    budget_bytes: int | None
    peak_bytes: int | None
    mean_util: float | None
    oom: bool
    note: str | None

    @property
    def nodes(self) -> tuple[str, ...]:
        """Its node, or a multi-node attempt's nodes in rank order (`node` holds "n1,n2"; `gpus`
        are then the indices it used on each)."""
        return tuple(self.node.split(","))

    @property
    def keys(self) -> tuple[tuple[str, int], ...]:
        """Every (node, GPU index) it used."""
        return tuple((n, i) for n in self.nodes for i in self.gpus)


@dataclass(frozen=True)
class EventRow:
    id: int
    t: float
    kind: str
    experiment: str | None
    message: str


@dataclass(frozen=True)
class Event:
    t: float
    kind: str
    experiment: str | None
    message: str


def _insert_event(db: sqlite3.Connection, event: Event | None) -> None:
    if event is not None:
        db.execute(
            "INSERT INTO events (t, kind, experiment, message) VALUES (?, ?, ?, ?)",
            (event.t, event.kind, event.experiment, event.message),
        )


def _gpus_text(gpus: Sequence[int]) -> str:
    return ",".join(str(g) for g in gpus)


def _gpus_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(g) for g in text.split(",") if g != "")


class Store:
    """Access to state.db. Writers use `Store(path)`; readers `Store(path, readonly=True)`."""

    def __init__(self, path: Path, readonly: bool = False, timeout_s: float = 60.0, immutable: bool = False):
        """immutable (read-only only): SQLite reads the file as it is, takes no lock and creates
        no -wal/-shm file, so a read-only directory is enough; only for a file that nobody writes
        and that has no -wal to apply (reader.py decides)."""
        self.path = Path(path)
        self.readonly = readonly
        self._batched = False
        try:
            if readonly:
                if not self.path.exists():
                    raise StoreError(f"{self.path}: no such state database")
                uri = f"file:{quote(str(self.path))}?" + ("immutable=1" if immutable else "mode=ro")
                self._db = sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)
                self._schema_version()
            else:
                self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: every commit survives a crash (kill -9) of gpupack; only a
                # power loss of the node could lose the last ones, and recovery handles that
                # like a scheduler death. FULL would cost an fsync per state change.
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
                )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    def _schema_version(self) -> int | None:
        """The run directory's schema version (None: a new, empty database); StoreError, in one
        line, for one this gpupack cannot read."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
            return None
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        version = int(row[0]) if row and str(row[0]).isdigit() else None
        if version is None or version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by another gpupack (schema {row[0] if row else 'unknown'}; this one knows"
                f" 1 to {SCHEMA_VERSION}): run it with that version, or upgrade gpupack"
            )
        return version

    def _migrate(self) -> None:
        """Bring an older run directory's tables to SCHEMA_VERSION, in one transaction."""
        version = self._schema_version()
        if version is None or version == SCHEMA_VERSION:
            return
        with self.transaction() as db:
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v]:
                    db.execute(statement)
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One committed write transaction; BEGIN IMMEDIATE takes the write lock up front (and
        waits up to timeout_s for another writer). Any SQLite failure, a full disk included,
        rolls back and surfaces as one StoreError. Inside `batch()` it joins the batch's one."""
        if self._batched:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from None
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from None
        try:
            yield self._db
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            raise StoreError(f"{self.path}: {exc}") from None
        except BaseException:
            self._rollback()
            raise

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Make the writes inside one transaction: all of them or none survive a crash. For the
        many changes of one moment (the ends reaped in one tick, 5,000 skips): one commit, not
        one each. Each change still lands with its event; nothing may act on them before the
        batch ends."""
        if self._batched:
            yield
            return
        with self.transaction():
            self._batched = True
            try:
                yield
            finally:
                self._batched = False

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after a full disk)

    # --- runs ---------------------------------------------------------------------------

    def begin_run(self, pid: int, host: str, job_id: str | None, gpus: str, now: float) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (started_at, pid, host, job_id, gpus) VALUES (?, ?, ?, ?, ?)",
                (now, pid, host, job_id, gpus),
            )
            return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, exit_code: int, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET ended_at = ?, exit_code = ? WHERE id = ?", (now, exit_code, run_id))

    def runs(self) -> list[dict[str, object]]:
        cur = self._db.execute("SELECT id, started_at, ended_at, pid, host, job_id, exit_code, gpus FROM runs ORDER BY id")
        keys = ("id", "started_at", "ended_at", "pid", "host", "job_id", "exit_code", "gpus")
        return [dict(zip(keys, row)) for row in cur.fetchall()]

    # --- experiments --------------------------------------------------------------------

    def experiments(self, states: Sequence[str] | None = None, params: bool = True) -> list[ExperimentRow]:
        """All experiments, or those in `states`; params=False leaves params empty (views that
        never show them skip a JSON parse per row: 40 ms over 10,000)."""
        query = (
            "SELECT name, phase, template, ord, fingerprint, state, reason, spec, params, in_manifest FROM experiments"
        )
        args: list[object] = []
        if states is not None:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args.extend(states)
        cur = self._db.execute(query + " ORDER BY in_manifest DESC, ord", args)
        # Grid siblings share one spec text: parse it once (rows are read-only, sharing is safe).
        specs: dict[str, Mapping[str, object]] = {}
        rows = []
        for r in cur.fetchall():
            spec = specs.get(r[7])
            if spec is None:
                spec = specs[r[7]] = json.loads(r[7])
            rows.append(
                ExperimentRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], spec, json.loads(r[8]) if params else {}, bool(r[9]))
            )
        return rows

    def phase_state_counts(self) -> list[tuple[str, str, int]]:
        """(phase, state, count) over the manifest's experiments, phases in manifest order."""
        return list(
            self._db.execute(
                "SELECT e.phase, e.state, count(*) FROM experiments e JOIN (SELECT phase, min(ord) AS first"
                " FROM experiments WHERE in_manifest = 1 GROUP BY phase) p ON p.phase = e.phase"
                " WHERE e.in_manifest = 1 GROUP BY e.phase, e.state ORDER BY p.first, e.state"
            )
        )

    def templates(self) -> dict[str, str]:
        """name -> template of every experiment: whose grid siblings finished attempts belong to."""
        return dict(self._db.execute("SELECT name, template FROM experiments"))

    def status_rows(self) -> list[tuple[Any, ...]]:
        """The manifest's experiments in order, each with its latest attempt, built by SQLite:
        (name, phase, state, reason, attempts, gpus, node, started_at, ended_at, exit_code), the
        attempt's columns None (and attempts 0) for one that never ran."""
        rows = self._db.execute(
            "SELECT e.name, e.phase, e.state, e.reason, coalesce(c.n, 0), a.gpus, a.node, a.started_at, a.ended_at,"
            " a.exit_code FROM experiments e"
            " LEFT JOIN (SELECT experiment, count(*) AS n, max(id) AS last FROM attempts GROUP BY experiment) c"
            " ON c.experiment = e.name LEFT JOIN attempts a ON a.id = c.last"
            " WHERE e.in_manifest = 1 ORDER BY e.ord"
        ).fetchall()
        gpus: dict[str | None, tuple[int, ...] | None] = {None: None}  # a few distinct values over thousands of rows
        out = []
        for r in rows:
            g = gpus.get(r[5])
            if g is None and r[5] is not None:
                g = gpus[r[5]] = _gpus_tuple(r[5])
            out.append((*r[:5], g, *r[6:]))
        return out

    def change_mark(self) -> str:
        """What a report shows, in a few aggregates: equal marks, an equal report (windows aside).
        Two aggregate queries, so a rerun of 10,000 finished experiments can tell cheaply."""
        attempts = self._db.execute(
            "SELECT count(*), coalesce(max(id), 0), count(ended_at), total(peak_bytes), total(mean_util) FROM attempts"
        ).fetchone()
        states = self._db.execute(
            "SELECT state, count(*), total(ord) FROM experiments WHERE in_manifest = 1 GROUP BY state ORDER BY state"
        ).fetchall()
        return repr((tuple(attempts), [tuple(r) for r in states]))

    def experiment_states(self) -> dict[str, str]:
        """name -> state of the experiments in the manifest, in manifest order (no JSON to parse)."""
        cur = self._db.execute("SELECT name, state FROM experiments WHERE in_manifest = 1 ORDER BY ord")
        return dict(cur.fetchall())

    def sync_experiments(self, rows: Sequence[ExperimentRow]) -> dict[str, str]:
        """Bring the table in line with the manifest being run.

        Returns name -> what changed: "new", or "changed" when a known experiment's fingerprint
        differs (it then becomes pending again, whatever its state was). Experiments no longer
        in the manifest are kept, flagged in_manifest=0, so their history is not lost.
        """
        # The stored columns as text: a rerun of an unchanged manifest writes nothing per row.
        known = {
            r[0]: r[1:]
            for r in self._db.execute(
                "SELECT name, phase, template, ord, fingerprint, spec, params, in_manifest FROM experiments"
            )
        }
        changes: dict[str, str] = {}
        with self.transaction() as db:
            for row in rows:
                old = known.get(row.name)
                spec, params = json.dumps(dict(row.spec), sort_keys=True), json.dumps(dict(row.params), default=str)
                if old is None:
                    changes[row.name] = "new"
                    db.execute(
                        "INSERT INTO experiments (name, phase, template, ord, fingerprint, state, spec, params)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (row.name, row.phase, row.template, row.ord, row.fingerprint, PENDING, spec, params),
                    )
                    continue
                if old[3] != row.fingerprint:
                    changes[row.name] = "changed"
                    db.execute(
                        "UPDATE experiments SET phase = ?, template = ?, ord = ?, fingerprint = ?, state = ?,"
                        " reason = ?, spec = ?, params = ?, in_manifest = 1 WHERE name = ?",
                        (row.phase, row.template, row.ord, row.fingerprint, PENDING,
                         "command, env or workdir changed", spec, params, row.name),
                    )  # fmt: skip
                elif old != (row.phase, row.template, row.ord, row.fingerprint, spec, params, 1):
                    db.execute(
                        "UPDATE experiments SET phase = ?, template = ?, ord = ?, spec = ?, params = ?,"
                        " in_manifest = 1 WHERE name = ?",
                        (row.phase, row.template, row.ord, spec, params, row.name),
                    )
            names = {row.name for row in rows}
            db.executemany(
                "UPDATE experiments SET in_manifest = 0 WHERE name = ?",
                [(name,) for name, old in known.items() if old[-1] and name not in names],
            )
        return changes

    def set_state(self, name: str, state: str, reason: str | None = None) -> None:
        assert state in STATES, state
        with self.transaction() as db:
            db.execute("UPDATE experiments SET state = ?, reason = ? WHERE name = ?", (state, reason, name))

    def set_states(self, states: Mapping[str, tuple[str, str | None]]) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE experiments SET state = ?, reason = ? WHERE name = ?",
                [(state, reason, name) for name, (state, reason) in states.items()],
            )

    def reset(self, names: Sequence[str]) -> int:
        """Forget outcomes so these run again (attempt history and numbering are kept)."""
        with self.transaction() as db:
            n = 0
            for name in names:
                cur = db.execute(
                    "UPDATE experiments SET state = ?, reason = 'reset' WHERE name = ? AND state != ?",
                    (PENDING, name, RUNNING),
                )
                n += cur.rowcount
            return n

    # --- attempts -----------------------------------------------------------------------

    def next_attempt_number(self, name: str) -> int:
        row = self._db.execute("SELECT MAX(number) FROM attempts WHERE experiment = ?", (name,)).fetchone()
        return int(row[0] or 0) + 1

    def begin_attempt(
        self,
        name: str,
        number: int,
        run_id: int | None,
        node: str,
        gpus: Sequence[int],
        log_path: str,
        budget_bytes: int | None,
        now: float,
    ) -> int:
        """Record the attempt before its process exists (state launching), so a crash between
        spawn and the pgid update still leaves a trace that recovery can follow."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO attempts (experiment, number, run_id, state, started_at, node, gpus, log_path, budget_bytes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, number, run_id, A_LAUNCHING, now, node, _gpus_text(gpus), log_path, budget_bytes),
            )
            db.execute("UPDATE experiments SET state = ?, reason = NULL WHERE name = ?", (RUNNING, name))
            return int(cur.lastrowid or 0)

    def attempt_launched(
        self, attempt_id: int, pgid: int, event: Event | None = None, leader_start: int | None = None
    ) -> None:
        """The attempt's process group, with its leader's start time (procs.start_time): a pgid
        alone names another group once this one is gone and the number is reused."""
        with self.transaction() as db:
            db.execute(
                "UPDATE attempts SET state = ?, pgid = ?, leader_start = ? WHERE id = ?",
                (A_RUNNING, pgid, leader_start, attempt_id),
            )
            _insert_event(db, event)

    def leader_starts(self, attempt_ids: Sequence[int]) -> dict[int, int | None]:
        """attempt id -> its group leader's recorded start time (writers only: schema 2)."""
        if not attempt_ids:
            return {}
        marks = ",".join("?" * len(attempt_ids))
        return dict(self._db.execute(f"SELECT id, leader_start FROM attempts WHERE id IN ({marks})", list(attempt_ids)))

    def end_attempt(
        self,
        attempt_id: int,
        attempt_state: str,
        exit_code: int | None,
        now: float,
        experiment_state: str,
        reason: str | None = None,
        oom: bool = False,
        note: str | None = None,
        event: Event | None = None,
        usage: tuple[int | None, float | None] | None = None,
    ) -> None:
        """Close the attempt (with its final peak memory and mean utilization), move its
        experiment and say so, in one transaction."""
        with self.transaction() as db:
            _insert_event(db, event)
            db.execute(
                "UPDATE attempts SET state = ?, exit_code = ?, ended_at = ?, oom = ?, note = ? WHERE id = ?",
                (attempt_state, exit_code, now, int(oom), note, attempt_id),
            )
            if usage is not None:
                db.execute("UPDATE attempts SET peak_bytes = ?, mean_util = ? WHERE id = ?", (*usage, attempt_id))
            db.execute(
                "UPDATE experiments SET state = ?, reason = ? WHERE name ="
                " (SELECT experiment FROM attempts WHERE id = ?)",
                (experiment_state, reason, attempt_id),
            )

    def record_usage(self, usage: Mapping[int, tuple[int | None, float | None]]) -> None:
        """attempt id -> (peak bytes so far, mean utilization so far)."""
        if not usage:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE attempts SET peak_bytes = ?, mean_util = ? WHERE id = ?",
                [(peak, util, attempt_id) for attempt_id, (peak, util) in usage.items()],
            )

    def attempts(self, name: str | None = None, states: Sequence[str] | None = None) -> list[AttemptRow]:
        query = (
            "SELECT id, experiment, number, run_id, state, started_at, ended_at, exit_code, node, gpus, pgid,"
            " log_path, budget_bytes, peak_bytes, mean_util, oom, note FROM attempts"
        )
        clauses: list[str] = []
        args: list[object] = []
        if name is not None:
            clauses.append("experiment = ?")
            args.append(name)
        if states:
            clauses.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY id"
        gpus: dict[str, tuple[int, ...]] = {}  # a few distinct values over thousands of rows
        rows = []
        for r in self._db.execute(query, args).fetchall():
            g = gpus.get(r[9])
            if g is None:
                g = gpus[r[9]] = _gpus_tuple(r[9])
            rows.append(
                AttemptRow(
                    r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], g, r[10], r[11], r[12], r[13], r[14],
                    bool(r[15]), r[16],
                )
            )
        return rows

    def succeeded_runs(self) -> list[tuple[str, float, int | None]]:
        """(experiment, duration_s, peak_bytes) of every succeeded attempt, oldest first, what
        estimates learn from: its duration is its own wall time plus that of the interrupted
        attempts it resumed (a 5-minute tail of a preempted 4-hour run took 4 hours 5 minutes)."""
        out: list[tuple[str, float, int | None]] = []
        chain: dict[str, float] = {}  # experiment -> time of the interrupted attempts since its last end
        for name, state, started_at, ended_at, peak in self._db.execute(
            "SELECT experiment, state, started_at, ended_at, peak_bytes FROM attempts"
            " WHERE state IN (?, ?, ?) ORDER BY id",
            (A_SUCCEEDED, A_INTERRUPTED, A_FAILED),
        ):
            took = max(0.0, ended_at - started_at) if ended_at is not None else 0.0
            if state == A_INTERRUPTED:
                chain[name] = chain.get(name, 0.0) + took
            elif state == A_SUCCEEDED:
                out.append((name, chain.pop(name, 0.0) + took, peak))
            else:
                chain.pop(name, None)  # the next attempt starts afresh (GPUPACK_RESUME unset)
        return out

    # --- events and samples -------------------------------------------------------------

    def event(self, kind: str, experiment: str | None, message: str, now: float | None = None) -> None:
        with self.transaction() as db:
            _insert_event(db, Event(time.time() if now is None else now, kind, experiment, message))

    def events(self, after_id: int = 0, limit: int | None = None) -> list[EventRow]:
        query = "SELECT id, t, kind, experiment, message FROM events WHERE id > ? ORDER BY id"
        args: list[object] = [after_id]
        if limit is not None:
            query = (
                "SELECT * FROM (SELECT id, t, kind, experiment, message FROM events WHERE id > ?"
                " ORDER BY id DESC LIMIT ?) ORDER BY id"
            )
            args.append(limit)
        return [EventRow(*r) for r in self._db.execute(query, args).fetchall()]

    def last_event_id(self, before: float) -> int:
        """The id of the last event stamped before `before` (0 if none): where a run's own events begin."""
        return self._db.execute("SELECT coalesce(max(id), 0) FROM events WHERE t < ?", (before,)).fetchone()[0]

    def add_gpu_samples(self, t: float, samples: Sequence[tuple[str, int, float | None, int | None, int]]) -> None:
        """samples: (node, gpu index, util percent, used bytes, total bytes)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO gpu_samples (t, node, gpu, util, used_bytes, total_bytes) VALUES (?, ?, ?, ?, ?, ?)",
                [(t, *s) for s in samples],
            )

    def gpu_samples(self) -> list[tuple[float, str, int, float | None, int | None, int]]:
        return list(self._db.execute("SELECT t, node, gpu, util, used_bytes, total_bytes FROM gpu_samples ORDER BY t"))

    def latest_gpu_samples(self) -> list[tuple[float, str, int, float | None, int | None, int]]:
        """The last reading of every GPU (the dashboard's GPU rows), without scanning history."""
        return list(
            self._db.execute(
                "SELECT t, node, gpu, util, used_bytes, total_bytes FROM gpu_samples"
                " WHERE t = (SELECT MAX(t) FROM gpu_samples) ORDER BY node, gpu"
            )
        )

    def gpu_usage(self) -> dict[tuple[str, int], tuple[float | None, int | None]]:
        """(node, gpu) -> (mean utilization over its samples, peak memory used), computed here
        rather than by loading every sample; merged samples weigh what they stand for."""
        return {
            (node, gpu): (util, peak)
            for node, gpu, util, peak in self._db.execute(
                "SELECT node, gpu, sum(util * n) / nullif(sum(CASE WHEN util IS NULL THEN 0 ELSE n END), 0),"
                " max(used_bytes) FROM gpu_samples GROUP BY node, gpu"
            )
        }

    def event_times(self) -> list[float]:
        return [t for (t,) in self._db.execute("SELECT t FROM events ORDER BY id")]

    def compact(
        self, now: float, tiers: Sequence[tuple[float, float]] = SAMPLE_TIERS, max_events: int = MAX_EVENTS
    ) -> None:
        """Bound the history (see SAMPLE_TIERS): merge old GPU samples into buckets, drop the
        oldest events beyond `max_events`. One transaction; cheap when there is nothing to do."""
        with self.transaction() as db:
            for age_s, bucket_s in tiers:
                cutoff = (now - age_s) // bucket_s * bucket_s  # whole buckets only
                top = db.execute("SELECT coalesce(max(rowid), 0) FROM gpu_samples").fetchone()[0]
                where = "rowid <= :top AND t < :cutoff"
                group = f"SELECT CAST(t / :b AS INTEGER), node, gpu FROM gpu_samples WHERE {where}" \
                    " GROUP BY 1, 2, 3 HAVING count(*) > 1"
                args = {"top": top, "cutoff": cutoff, "b": bucket_s}
                db.execute(
                    "INSERT INTO gpu_samples (t, node, gpu, util, used_bytes, total_bytes, n)"
                    " SELECT CAST(t / :b AS INTEGER) * :b, node, gpu,"
                    " sum(util * n) / nullif(sum(CASE WHEN util IS NULL THEN 0 ELSE n END), 0),"
                    f" max(used_bytes), max(total_bytes), sum(n) FROM gpu_samples WHERE {where}"
                    " GROUP BY CAST(t / :b AS INTEGER), node, gpu HAVING count(*) > 1",
                    args,
                )
                db.execute(f"DELETE FROM gpu_samples WHERE {where} AND (CAST(t / :b AS INTEGER), node, gpu) IN ({group})", args)
            first_kept = db.execute(
                "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (max(0, max_events - 1),)
            ).fetchone()
            if first_kept is None:
                return
            dropped = dict(db.execute("SELECT kind, count(*) FROM events WHERE id < ? GROUP BY kind", (first_kept[0],)))
            if not dropped:
                return
            row = db.execute("SELECT value FROM meta WHERE key = 'events_dropped'").fetchone()
            counts: dict[str, int] = json.loads(row[0]) if row else {}
            for kind, n in dropped.items():
                counts[kind] = counts.get(kind, 0) + n
            db.execute("DELETE FROM events WHERE id < ?", (first_kept[0],))
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('events_dropped', ?)", (json.dumps(counts, sort_keys=True),)
            )

    def set_meta(self, values: Mapping[str, str]) -> None:
        with self.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def backup_to(self, path: Path) -> None:
        """A consistent copy of the whole database at `path` (SQLite's online backup API, which
        reads while the run writes), in rollback-journal mode: read with immutable=1, it needs no
        -wal/-shm. `path` should be on a local disk (publish.py moves it where it belongs)."""
        dest = sqlite3.connect(str(path))
        try:
            self._db.backup(dest)
            dest.execute("PRAGMA journal_mode=DELETE")
        finally:
            dest.close()

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
