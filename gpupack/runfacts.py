"""What a run's database says happened, read once for the report, its timeline and the
dashboard: the run's allocations (windows), every GPU it had, its experiments, attempts and
samples, and how views name a GPU (gpu0 on one node, n1:gpu0 among several)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy import GpuKey
from .store import AttemptRow, ExperimentRow, Store


def gpu_label(key: GpuKey, single_node: bool) -> str:
    return f"gpu{key[1]}" if single_node else f"{key[0]}:gpu{key[1]}"


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one occupant."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@dataclass(frozen=True)
class Window:
    """One run of the run directory: an allocation, from the scheduler's start to its end."""

    start: float
    end: float
    gpus: frozenset[GpuKey] | None  # the run's inventory; None where it was not recorded


@dataclass(frozen=True)
class RunFacts:
    """Everything the report needs, read once from the store."""

    meta: dict[str, str]
    experiments: list[ExperimentRow]
    attempts: list[AttemptRow]
    samples: list[tuple[float, str, int, float | None, int | None, int]]
    windows: list[Window]  # in time order
    gpus: dict[GpuKey, dict[str, Any]]  # every GPU the run had: name, total_bytes
    # GPU -> (mean utilization, peak memory used), from the store (old samples are merged there)
    usage: dict[GpuKey, tuple[float | None, int | None]] = field(default_factory=dict)

    @property
    def single_node(self) -> bool:
        return len({key[0] for key in self.gpus}) <= 1

    def attempt_end(self, attempt: AttemptRow) -> float:
        """A running (or orphaned) attempt lasts until the end of the allocation it started in."""
        if attempt.ended_at is not None:
            return attempt.ended_at
        for w in self.windows:
            if w.start <= attempt.started_at <= w.end:
                return w.end
        return max(attempt.started_at, self.windows[-1].end if self.windows else attempt.started_at)

    def attempt_keys(self, attempt: AttemptRow) -> list[GpuKey]:
        return [gpu_key(self.gpus, n, g) for n, g in attempt.keys]

    def wall_s(self, key: GpuKey | None = None) -> float:
        """Allocated time: of the whole run, or of the runs that had this GPU."""
        return sum(w.end - w.start for w in self.windows if key is None or w.gpus is None or key in w.gpus)


def gpu_key(inventory: Mapping[GpuKey, Any], node: str, index: int) -> GpuKey:
    """An attempt recorded without a node (local run) belongs to the one node of the inventory."""
    if not node:
        nodes = {k[0] for k in inventory}
        if len(nodes) == 1:
            return (next(iter(nodes)), index)
    return (node, index)


def load_facts(store: Store) -> RunFacts:
    meta = store.meta()
    experiments = [e for e in store.experiments() if e.in_manifest]
    attempts = store.attempts()
    samples = store.gpu_samples()
    gpus: dict[GpuKey, dict[str, Any]] = {}
    try:
        for g in json.loads(meta.get("gpus") or "[]"):
            gpus[(str(g["node"]), int(g["index"]))] = {"name": g.get("name", ""), "total_bytes": g.get("total_bytes")}
    except (ValueError, TypeError, KeyError):
        pass  # an unreadable inventory only loses GPU names; runs, samples and attempts still name the GPUs
    windows = _windows(store, attempts, samples)
    for w in windows:
        for key in w.gpus or ():
            gpus.setdefault(key, {"name": "", "total_bytes": None})
    for _t, node, index, _util, _used, total in samples:
        gpus.setdefault((node, index), {"name": "", "total_bytes": total})
    for a in attempts:
        for n, g in a.keys:
            gpus.setdefault(gpu_key(gpus, n, g), {"name": "", "total_bytes": None})
    return RunFacts(meta, experiments, attempts, samples, windows, dict(sorted(gpus.items())), store.gpu_usage())


def _run_gpus(text: object) -> frozenset[GpuKey] | None:
    """runs.gpus as the engine writes it: "node:index:total_bytes,..." (node names hold no ':')."""
    try:
        keys = [part.rsplit(":", 2) for part in str(text or "").split(",") if part]
        return frozenset((node, int(index)) for node, index, _total in keys) or None
    except ValueError:
        return None


def _windows(store: Store, attempts: list[AttemptRow], samples: list[tuple[Any, ...]]) -> list[Window]:
    """Each run's window. A run that did not record its end (killed, or still going) ends at
    its last sign of life: a sample, an event or an attempt time before the next run began."""
    activity = sorted(
        [s[0] for s in samples]
        + store.event_times()
        + [a.started_at for a in attempts]
        + [a.ended_at for a in attempts if a.ended_at is not None]
    )
    runs = store.runs()
    if not runs:
        return [Window(activity[0], activity[-1], None)] if activity else []
    windows = []
    for i, run in enumerate(runs):
        start = float(str(run["started_at"]))
        if run["ended_at"] is not None:
            end = float(str(run["ended_at"]))
        else:
            limit = float(str(runs[i + 1]["started_at"])) if i + 1 < len(runs) else float("inf")
            end = max([t for t in activity if start <= t < limit], default=start)
        windows.append(Window(start, end, _run_gpus(run["gpus"])))
    return windows
