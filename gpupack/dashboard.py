"""What a person sees of a run: the live view in a terminal, plain lines in a job log, `status`, `watch`.

Everything shown is read from state.db, so the engine's own view and `gpupack watch` from
another terminal are the same view. The engine calls `refresh(now)` on every tick.

Terminal (live=True): one rich Live panel redrawn in place: allocation (job, elapsed, time
left, ETA), a progress bar per phase, one row per GPU (utilization, memory, occupants), and the
recent events.

Job log (live=False): rich Live off a terminal writes only its last frame (rich #3040), so
nothing here moves the cursor or colours: each event is one line, flushed at once, and every
`log_every_s` a snapshot table in plain ASCII, readable in `less` and `tail -f`:

    2026-11-22 14:03:12 start     bridge-sst2-s42 started on gpu0 (attempt 1)
    === demo 2026-11-22 14:04:00 | job 4242 | elapsed 25m00s | left 1h35m | ETA ~41m ===
    phase    progress       done  running  failed  pending
    seeds    [#########.]    5/6        0       0        1
    ...
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .report import GpuKey, gpu_key, gpu_label
from .store import (
    A_LAUNCHING, A_RUNNING, A_SUCCEEDED, FAILED, INTERRUPTED, PENDING, RUNNING, SKIPPED, SUCCEEDED, EventRow, Store,
)
from .units import format_bytes, format_duration

RECENT_EVENTS = 8
SNAPSHOT_WIDTH = 120  # a job log has no width; wide enough for a GPU row and its occupants
_LIVE_MIN_INTERVAL_S = 0.5  # bursts of child exits call refresh many times; a redraw per half second is enough
_EVENT_STYLE = {
    "start": "cyan", "finish": "green", "fail": "bold red", "oom": "bold red", "retry": "yellow", "warn": "yellow",
    "interrupt": "magenta", "stop": "magenta", "skip": "dim", "changed": "blue", "info": "",
}
_STATE_STYLE = {SUCCEEDED: "green", FAILED: "bold red", RUNNING: "cyan", INTERRUPTED: "magenta", SKIPPED: "dim", PENDING: ""}


@dataclass(frozen=True)
class Occupant:
    name: str
    budget_bytes: int | None  # None: holds the GPU whole
    peak_bytes: int | None


@dataclass(frozen=True)
class GpuView:
    label: str
    util_pct: float | None
    used_bytes: int | None
    total_bytes: int | None
    occupants: tuple[Occupant, ...]


@dataclass(frozen=True)
class PhaseView:
    name: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return self.counts.get(SUCCEEDED, 0) + self.counts.get(FAILED, 0) + self.counts.get(SKIPPED, 0)


@dataclass(frozen=True)
class View:
    """One consistent read of the run, rendered live or as plain text."""

    run: str
    now: float
    job_id: str
    started_at: float | None  # this run (allocation) of the run directory
    alloc_end: float | None  # None: no known limit
    eta_s: float | None
    unestimated: int  # remaining experiments with no time estimate, left out of the ETA
    phases: tuple[PhaseView, ...]
    gpus: tuple[GpuView, ...]
    events: tuple[EventRow, ...]


def build_view(store: Store, now: float) -> View:
    meta = store.meta()
    runs = store.runs()
    experiments = [e for e in store.experiments() if e.in_manifest]
    running = store.attempts(states=[A_LAUNCHING, A_RUNNING])
    inventory: dict[GpuKey, str] = {}
    try:
        for g in json.loads(meta.get("gpus") or "[]"):
            inventory[(str(g["node"]), int(g["index"]))] = str(g.get("name", ""))
    except (ValueError, TypeError, KeyError):
        pass  # without the inventory the GPUs come from the samples alone
    latest: dict[GpuKey, tuple[float | None, int | None, int]] = {}
    for _t, node, index, util, used, total in store.gpu_samples():
        latest[(node, index)] = (util, used, total)  # rows come in time order: the last one wins
    keys = list(inventory) + [k for k in sorted(latest) if k not in inventory]
    occupants: dict[GpuKey, list[Occupant]] = defaultdict(list)
    for a in running:
        for index in a.gpus:
            occupants[gpu_key(inventory or latest, a.node, index)].append(Occupant(a.experiment, a.budget_bytes, a.peak_bytes))
    single = len({k[0] for k in keys}) <= 1
    gpus = tuple(
        GpuView(gpu_label(k, single), *latest.get(k, (None, None, None)), tuple(occupants.get(k, ())))
        for k in keys
    )
    phases: dict[str, Counter[str]] = {}
    for e in experiments:
        phases.setdefault(e.phase, Counter())[e.state] += 1
    eta, unknown = estimate_eta(store, experiments, running, len(keys), now)
    alloc_end = meta.get("alloc_end") or ""
    return View(
        run=meta.get("run_name", ""), now=now, job_id=meta.get("job_id", ""),
        started_at=float(runs[-1]["started_at"]) if runs else None,  # type: ignore[arg-type]
        alloc_end=float(alloc_end) if alloc_end else None, eta_s=eta, unestimated=unknown,
        phases=tuple(PhaseView(p, dict(c)) for p, c in phases.items()), gpus=gpus,
        events=tuple(store.events(limit=RECENT_EVENTS)),
    )


def estimate_eta(store: Store, experiments: list[Any], running: list[Any], n_gpus: int, now: float) -> tuple[float | None, int]:
    """(seconds until everything left is done, how many left have no estimate).

    Work left is each experiment's remaining time x the share of its GPUs it takes (the larger of
    its declared `util` and its memory over the GPU's size, since memory caps packing), spread
    over all GPUs, but never less than the longest single experiment left. Dependencies and
    barriers are ignored, so it is a floor. An experiment without a time estimate borrows the
    mean duration of its grid siblings that succeeded, else is counted as unknown."""
    learned: dict[str, list[float]] = defaultdict(list)
    template = {e.name: e.template for e in experiments}
    for a in store.attempts(states=[A_SUCCEEDED]):
        if a.ended_at is not None and a.experiment in template:
            learned[template[a.experiment]].append(a.ended_at - a.started_at)
    started = {a.experiment: a.started_at for a in running}
    work, longest, unknown = 0.0, 0.0, 0
    for e in experiments:
        if e.state not in (PENDING, RUNNING, INTERRUPTED):
            continue
        spec = e.spec
        time_s = spec.get("time_s") or (sum(learned[e.template]) / len(learned[e.template]) if learned[e.template] else None)
        if time_s is None:
            unknown += 1
            continue
        left = max(0.0, time_s - (now - started[e.name])) if e.name in started else float(time_s)
        gpus, mem = int(spec.get("gpus", 1) or 0), spec.get("mem_bytes")
        capacity = _typical_capacity(store)
        share = 1.0 if spec.get("exclusive") or not mem or not capacity else max(float(spec.get("util", 1.0)), mem / capacity)
        work += left * gpus * min(share, 1.0)
        longest = max(longest, left)
    if work == 0 and longest == 0:
        return (None if unknown else 0.0), unknown
    return max(work / max(n_gpus, 1), longest), unknown


def _typical_capacity(store: Store) -> int | None:
    try:
        sizes = [int(g["total_bytes"]) for g in json.loads(store.meta().get("gpus") or "[]")]
    except (ValueError, TypeError, KeyError):
        return None
    return min(sizes) if sizes else None
