"""The store's schema: the tables of state.db, their version and the migrations of older run
directories, the rows read back, and `Database`: the connection (WAL for a writer, read-only or
immutable for a reader), its transactions and batches, meta, backup and the integrity check.
The queries are in store_experiments.py, store_attempts.py and store_history.py; `store.Store`
joins them. Only the store modules touch SQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

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
class Event:
    """A line of the run's history; `id` is its row id once stored (0 before: the engine's own)."""

    t: float
    kind: str
    experiment: str | None
    message: str
    id: int = 0


def insert_event(db: sqlite3.Connection, event: Event | None) -> None:
    if event is not None:
        db.execute(
            "INSERT INTO events (t, kind, experiment, message) VALUES (?, ?, ?, ?)",
            (event.t, event.kind, event.experiment, event.message),
        )


def gpus_text(gpus: Sequence[int]) -> str:
    return ",".join(str(g) for g in gpus)


def gpus_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(g) for g in text.split(",") if g != "")


class Database:
    """The connection to state.db, and the transactions every query module writes in."""

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
