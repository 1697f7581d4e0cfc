"""Queries of the attempts table: an attempt recorded before its process exists, its process
group once launched, its end (with its experiment's new state and the event, in one transaction),
its usage, and the succeeded runs estimates learn from. Part of `store.Store`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .states import A_FAILED, A_INTERRUPTED, A_LAUNCHING, A_RUNNING, A_SUCCEEDED, RUNNING
from .store_schema import AttemptRow, Database, Event, gpus_text, gpus_tuple, insert_event


class AttemptQueries(Database):
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
                (name, number, run_id, A_LAUNCHING, now, node, gpus_text(gpus), log_path, budget_bytes),
            )
            db.execute("UPDATE experiments SET state = ?, reason = NULL WHERE name = ?", (RUNNING, name))
            return int(cur.lastrowid or 0)

    def attempt_launched(
        self, attempt_id: int, pgid: int, event: Event | None = None, leader_start: int | None = None
    ) -> None:
        """The attempt's process group, with its leader's start time (procs.start_time) where it is
        known already (else set_leader_starts, a tick later): a pgid alone names another group
        once this one is gone and the number is reused."""
        with self.transaction() as db:
            db.execute(
                "UPDATE attempts SET state = ?, pgid = ?, leader_start = ? WHERE id = ?",
                (A_RUNNING, pgid, leader_start, attempt_id),
            )
            insert_event(db, event)

    def set_leader_starts(self, starts: Mapping[int, int]) -> None:
        """attempt id -> its group leader's start time, for attempts launched without it."""
        if starts:
            with self.transaction() as db:
                db.executemany("UPDATE attempts SET leader_start = ? WHERE id = ?", [(t, i) for i, t in starts.items()])

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
            insert_event(db, event)
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
                g = gpus[r[9]] = gpus_tuple(r[9])
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
