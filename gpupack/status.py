"""`gpupack status`: the run's state as data (the --json contract of DESIGN.md), one builder for
the table, the JSON, tests and scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .store import AttemptRow, Store


def status_data(store: Store, run_name: str) -> dict[str, Any]:
    """{"run": name, "experiments": [{name, phase, state, attempts, gpus, node, started_at,
    ended_at, exit_code}]}; gpus/node/times/exit_code are those of the latest attempt."""
    latest: dict[str, AttemptRow] = {}
    counts: dict[str, int] = {}
    for attempt in store.attempts():
        latest[attempt.experiment] = attempt
        counts[attempt.experiment] = counts.get(attempt.experiment, 0) + 1
    experiments = []
    for row in store.experiments():
        if not row.in_manifest:
            continue
        last = latest.get(row.name)
        experiments.append(
            {
                "name": row.name,
                "phase": row.phase,
                "state": row.state,
                "attempts": counts.get(row.name, 0),
                "gpus": list(last.gpus) if last else [],
                "node": last.node if last else None,
                "started_at": last.started_at if last else None,
                "ended_at": last.ended_at if last else None,
                "exit_code": last.exit_code if last else None,
                "reason": row.reason,
            }
        )
    return {"run": run_name, "experiments": experiments}


def open_run(run_dir: Path) -> Store:
    return Store(Path(run_dir) / "state.db", readonly=True)
