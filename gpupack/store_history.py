"""Queries of the history: events (what the dashboard and the job log show), GPU samples, and
their retention (`compact`: old samples merged into buckets, the oldest events beyond MAX_EVENTS
dropped and counted). Part of `store.Store`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from .store_schema import Database, Event, insert_event

# Retention (Store.compact): GPU samples older than an age are merged per GPU into buckets (the
# mean utilization weighted by the samples merged, the peak memory), and only the latest
# MAX_EVENTS events are kept, with per-kind counts of the dropped ones in meta 'events_dropped'.
# A 24-hour run of 4 GPUs sampled every 5 s keeps ~8,000 sample rows instead of ~69,000.
SAMPLE_TIERS: tuple[tuple[float, float], ...] = ((3600.0, 60.0), (86400.0, 900.0))  # (older than, bucket) s
MAX_EVENTS = 20_000


class HistoryQueries(Database):
    def event(self, kind: str, experiment: str | None, message: str, now: float | None = None) -> None:
        with self.transaction() as db:
            insert_event(db, Event(time.time() if now is None else now, kind, experiment, message))

    def events(self, after_id: int = 0, limit: int | None = None) -> list[Event]:
        query = "SELECT t, kind, experiment, message, id FROM events WHERE id > ? ORDER BY id"
        args: list[object] = [after_id]
        if limit is not None:
            query = (
                "SELECT * FROM (SELECT t, kind, experiment, message, id FROM events WHERE id > ?"
                " ORDER BY id DESC LIMIT ?) ORDER BY id"
            )
            args.append(limit)
        return [Event(*r) for r in self._db.execute(query, args).fetchall()]

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
