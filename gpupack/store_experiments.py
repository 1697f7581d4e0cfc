"""Queries of the runs and experiments tables: the manifest's experiments synced in (a
fingerprint change makes one pending again), their states, and the aggregates the views read
(status rows, per-phase counts, the report's change mark). Part of `store.Store`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .states import PENDING, RUNNING, STATES
from .store_schema import Database, ExperimentRow, gpus_tuple


class ExperimentQueries(Database):
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
                g = gpus[r[5]] = gpus_tuple(r[5])
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
