"""What a person sees of a run: the live view in a terminal, plain lines in a job log, `status`, `watch`.

Everything shown is read from state.db, so the engine's own view and `gpupack watch` from
another terminal are the same view. The engine calls `refresh(now)` on every tick.

Terminal (live=True): one rich Live panel redrawn in place: allocation (job, elapsed, time
left, ETA), a progress bar per phase, one row per GPU (utilization, memory, occupants), and the
recent events.

Job log (live=False): rich Live off a terminal writes only its last frame (rich #3040), so
nothing here moves the cursor or colours: each event is one line, flushed at once, and every
`log_every_s` a snapshot table in plain ASCII, readable in `less` and `tail -f`:

    2026-11-22 09:12:09 finish    probe-l1 succeeded in 3s on gpu1
    === 2026-11-22 09:12:09 | vis | job 4242 | elapsed 3s | left 1h35m | ETA ~7s ===
    phase   | progress             | done | running | failed | pending
    --------+----------------------+------+---------+--------+--------
    seeds   | #######............. |  2/6 |       4 |      0 |       0
    GPU  | util (3s ago)   | memory used            | occupants (peak/budget)
    -----+-----------------+------------------------+---------------------------
    gpu0 |  97% #########. | ######.... 48.1/80.0 GB | bridge-sst2-s3 (21.2 GB/30.0 GB)
         |                 |                         | probe-l3 (-/10.0 GB)
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .policy import GpuKey
from .runfacts import gpu_key, gpu_label
from .store import (
    A_LAUNCHING, A_RUNNING, FAILED, INTERRUPTED, PENDING, RUNNING, SKIPPED, SUCCEEDED, AttemptRow, Event,
    UNAVAILABLE_META, ExperimentRow, Store,
)
from .units import format_bytes, format_duration

if TYPE_CHECKING:  # rich is imported where something is drawn: the views' data (reader, publish) need none
    from rich.console import Console, RenderableType
    from rich.live import Live
    from rich.table import Table

RECENT_EVENTS = 8
_LEFT = (PENDING, RUNNING, INTERRUPTED)  # experiments whose work is still to do
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
    unavailable: str = ""  # why it takes no new experiment (readings failing, node lost)
    node: str = ""  # rows are grouped by node when there are several


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
    ended_at: float | None  # None while it goes on
    alloc_end: float | None  # None: no known limit
    sampled_at: float | None  # time of the GPU readings shown (the engine samples every few seconds)
    eta_s: float | None
    unestimated: int  # remaining experiments with no time estimate, left out of the ETA
    phases: tuple[PhaseView, ...]
    gpus: tuple[GpuView, ...]
    events: tuple[Event, ...]


def build_view(store: Store, now: float) -> View:
    meta = store.meta()
    runs = store.runs()
    # Counts by SQL and full rows only of what is left: a view of a 10,000-experiment run is
    # built every second (watch, the live dashboard, the published snapshot).
    left = [e for e in store.experiments(states=_LEFT, params=False) if e.in_manifest]
    running = store.attempts(states=[A_LAUNCHING, A_RUNNING])
    inventory: dict[GpuKey, int | None] = {}  # GPU -> total bytes
    try:
        for g in json.loads(meta.get("gpus") or "[]"):
            inventory[(str(g["node"]), int(g["index"]))] = g.get("total_bytes")
    except (ValueError, TypeError, KeyError):
        pass  # without the inventory the GPUs come from the samples alone
    latest: dict[GpuKey, tuple[float | None, int | None, int | None]] = {k: (None, None, t) for k, t in inventory.items()}
    started_at = _seconds(runs[-1]["started_at"]) if runs else None
    sampled_at = None
    for t, node, index, util, used, total in store.latest_gpu_samples():
        if started_at is not None and t < started_at:
            continue  # an earlier allocation's readings say nothing about these GPUs now
        latest[(node, index)] = (util, used, total)
        sampled_at = t
    keys = list(inventory) + [k for k in sorted(latest) if k not in inventory]
    occupants: dict[GpuKey, list[Occupant]] = defaultdict(list)
    for a in running:
        for node, index in a.keys:  # a multi-node attempt: its GPUs on each of its nodes
            occupants[gpu_key(inventory or latest, node, index)].append(Occupant(a.experiment, a.budget_bytes, a.peak_bytes))
    # Several nodes: rows grouped by node (a heading row each), so a GPU is labelled as on one node.
    node_order = {n: i for i, n in enumerate(dict.fromkeys(n for n, _ in keys))}
    keys.sort(key=lambda k: node_order[k[0]])
    try:
        unavailable = {str(k): str(v) for k, v in json.loads(meta.get(UNAVAILABLE_META) or "{}").items()}
    except (ValueError, AttributeError):
        unavailable = {}
    gpus = tuple(
        GpuView(gpu_label(k, True), *latest[k], tuple(occupants.get(k, ())), unavailable.get(f"{k[0]}:{k[1]}", ""), node=k[0])
        for k in keys
    )
    phases: dict[str, Counter[str]] = {}
    for phase, state, count in store.phase_state_counts():
        phases.setdefault(phase, Counter())[state] += count
    sizes = [total for _u, _used, total in latest.values() if total]
    eta, unknown = estimate_eta(store, left, running, len(keys), min(sizes, default=None), now)
    alloc_end = meta.get("alloc_end") or ""
    return View(
        run=meta.get("run_name", ""), now=now, job_id=meta.get("job_id", ""),
        started_at=started_at,
        ended_at=_seconds(runs[-1]["ended_at"]) if runs else None,
        alloc_end=float(alloc_end) if alloc_end else None, sampled_at=sampled_at, eta_s=eta, unestimated=unknown,
        phases=tuple(PhaseView(p, dict(c)) for p, c in phases.items()), gpus=gpus,
        events=tuple(store.events(limit=RECENT_EVENTS)),
    )


def _seconds(value: object) -> float | None:
    return None if value is None else float(str(value))


def estimate_eta(
    store: Store, experiments: Sequence[ExperimentRow], running: Sequence[AttemptRow], n_gpus: int,
    capacity_bytes: int | None, now: float,
) -> tuple[float | None, int]:
    """(seconds until everything left is done, how many left have no estimate).

    Work left is each experiment's remaining time x the share of its GPUs it takes (the larger of
    its declared `util` and its memory over the GPU's size, since memory caps packing), spread
    over all GPUs, but never less than the longest single experiment left. Dependencies and
    barriers are ignored, so it is a floor. An experiment without a time estimate borrows the
    mean duration of its grid siblings that succeeded, else is counted as unknown. `experiments`
    needs only those left (pending, running, interrupted); others are passed over."""
    learned: dict[str, list[float]] = defaultdict(list)
    template = store.templates()
    for name, took_s, _peak in store.succeeded_runs():
        if name in template:
            learned[template[name]].append(took_s)
    started = {a.experiment: a.started_at for a in running}
    work, longest, unknown = 0.0, 0.0, 0
    for e in experiments:
        if e.state not in _LEFT:
            continue
        spec: Mapping[str, Any] = e.spec
        siblings = learned[e.template]
        time_s = spec.get("time_s") or (sum(siblings) / len(siblings) if siblings else None)
        if time_s is None:
            unknown += 1
            continue
        left = max(0.0, time_s - (now - started[e.name])) if e.name in started else float(time_s)
        mem = spec.get("mem_bytes")
        share = 1.0
        if mem and capacity_bytes and not spec.get("exclusive") and spec.get("nodes", 1) == 1:  # whole nodes: 1
            share = min(1.0, max(float(spec.get("util", 1.0)), mem / capacity_bytes))
        work += left * int(spec.get("gpus", 1)) * int(spec.get("nodes", 1)) * share
        longest = max(longest, left)
    if work == 0 and longest == 0:
        return (None if unknown else 0.0), unknown
    return max(work / max(n_gpus, 1), longest), unknown


# --- rendering: one set of builders, two skins (live: colour and block bars; plain: ASCII) -----


def _bar(fraction: float | None, width: int, plain: bool) -> str:
    if fraction is None:
        return " " * width
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "#" * filled + "." * (width - filled) if plain else "█" * filled + "░" * (width - filled)


def _header(view: View) -> str:
    parts = [view.run or "gpupack"]
    if view.job_id:
        parts.append(f"job {view.job_id}")
    if view.ended_at is not None and view.started_at is not None:
        parts.append(f"ended after {format_duration(view.ended_at - view.started_at)}")
        return " | ".join(parts)
    if view.started_at is not None:
        parts.append(f"elapsed {format_duration(view.now - view.started_at)}")
    parts.append(f"left {format_duration(view.alloc_end - view.now)}" if view.alloc_end is not None else "no time limit")
    if view.eta_s is not None:
        parts.append(f"ETA ~{format_duration(view.eta_s)}" + (f" (+{view.unestimated} unestimated)" if view.unestimated else ""))
    elif view.unestimated:
        parts.append(f"ETA unknown ({view.unestimated} unestimated)")
    return " | ".join(parts)


def _phase_table(view: View, plain: bool) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("phase")
    table.add_column("progress")
    for count in ("done", "running", "failed", "pending"):
        table.add_column(count, justify="right")
    for p in view.phases:
        fraction = p.done / p.total if p.total else 0.0
        failed = p.counts.get(FAILED, 0)
        table.add_row(
            p.name, Text(_bar(fraction, 20, plain), style="" if plain else "green"), f"{p.done}/{p.total}",
            str(p.counts.get(RUNNING, 0)), Text(str(failed), style="" if plain or not failed else "bold red"),
            str(p.counts.get(PENDING, 0) + p.counts.get(INTERRUPTED, 0)),
        )
    return table


def _occupant(o: Occupant) -> str:
    if o.budget_bytes is None:
        return f"{o.name} (whole GPU)"
    peak = format_bytes(o.peak_bytes) if o.peak_bytes is not None else "-"
    return f"{o.name} ({peak}/{format_bytes(o.budget_bytes)})"


def _memory(used: int | None, total: int | None) -> str:
    """'20.0/80.0 GB': one unit for both, the total's."""
    if total is None:
        return format_bytes(used)
    unit = format_bytes(total).split()[-1]
    scale = {"TB": 1e12, "GB": 1e9, "MB": 1e6, "KB": 1e3}.get(unit, 1.0)
    return f"{'?' if used is None else f'{used / scale:.1f}'}/{format_bytes(total)}"


def _gpu_table(view: View, plain: bool) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("GPU")
    age = f" ({format_duration(view.now - view.sampled_at)} ago)" if view.sampled_at is not None else ""
    table.add_column(f"util{age}", no_wrap=True)
    table.add_column("memory used", no_wrap=True)
    table.add_column("occupants (peak/budget)", no_wrap=True)
    several = len({g.node for g in view.gpus}) > 1
    node = None
    for g in view.gpus:
        if several and g.node != node:
            node = g.node
            mine = [h for h in view.gpus if h.node == node]
            heading = f"{sum(1 for h in mine if h.occupants)} of {len(mine)} GPUs busy"
            if len({h.unavailable for h in mine}) == 1 and mine[0].unavailable:  # the node as a whole (lost)
                heading += f"; node unavailable: {mine[0].unavailable}"
            table.add_row(Text(f"node {node}", style="" if plain else "bold"), "", "", heading)
        used = g.used_bytes / g.total_bytes if g.used_bytes is not None and g.total_bytes else None
        util = Text("  ?" if g.util_pct is None else f"{g.util_pct:>3.0f}%")
        util.append(" " + _bar(None if g.util_pct is None else g.util_pct / 100, 10, plain), style="" if plain else "cyan")
        memory = Text(_bar(used, 10, plain) + " ", style="" if plain else ("red" if used and used > 0.95 else "magenta"))
        memory.append(_memory(g.used_bytes, g.total_bytes))
        label = f"  {g.label}" if several else g.label
        who = "\n".join(_occupant(o) for o in g.occupants) or "-"
        if g.unavailable:
            who = f"UNAVAILABLE: {g.unavailable}" + ("" if who == "-" else "\n" + who)
        table.add_row(label, util, memory, who)
    return table


def event_line(event: Event) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.t))
    return f"{stamp} {event.kind:<9} {event.message}"


def live_renderable(view: View) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    events = Text()
    for e in view.events:
        events.append(time.strftime("%H:%M:%S ", time.localtime(e.t)), style="dim")
        events.append(f"{e.kind:<9} ", style=_EVENT_STYLE.get(e.kind, ""))
        events.append(e.message + "\n")
    body = Group(
        Text(_header(view), style="bold"), "", _phase_table(view, plain=False), "", _gpu_table(view, plain=False), "",
        Text("recent events", style="bold"), events if view.events else Text("none yet", style="dim"),
    )
    return Panel(body, title="gpupack", title_align="left", border_style="blue")


def plain_snapshot(view: View, width: int = SNAPSHOT_WIDTH) -> str:
    """The snapshot as ASCII text without escape codes (rendered by a console that has no colours)."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False, emoji=False)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view.now))
    console.print(f"=== {stamp} | {_header(view)} ===", markup=False, soft_wrap=True)
    console.print(_phase_table(view, plain=True))
    console.print(_gpu_table(view, plain=True))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


class ViewSource(Protocol):
    """Where a dashboard's views and events come from: the database (the engine, `watch` on the
    scheduler's host) or the published snapshot (reader.py, `watch` from another host)."""

    def view(self, now: float) -> View: ...
    def events_after(self, event_id: int) -> list[Event]: ...
    def first_event_id(self) -> int: ...


class StoreViews:
    def __init__(self, store: Store):
        self.store = store

    def view(self, now: float) -> View:
        return build_view(self.store, now)

    def events_after(self, event_id: int) -> list[Event]:
        return self.store.events(after_id=event_id)

    def first_event_id(self) -> int:
        """Events before this run began: a dashboard shows this run's, not the run directory's history."""
        runs = self.store.runs()
        since = _seconds(runs[-1]["started_at"]) if runs else None
        return self.store.last_event_id(before=since) if since is not None else 0


class Dashboard:
    """The run as the engine shows it: call start(), refresh(now) on every tick, stop()."""

    def __init__(self, store: Store | ViewSource, run_dir: Path, console: Console, live: bool, log_every_s: float = 60.0):
        self.source: ViewSource = StoreViews(store) if isinstance(store, Store) else store
        self.run_dir = Path(run_dir)
        self.console = console
        self.live = live
        self.log_every_s = log_every_s
        self._last_event_id = 0
        self._last_snapshot: float | None = None
        self._last_draw = float("-inf")
        self._live: Live | None = None

    def start(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._last_event_id = self.source.first_event_id()
        if self.live:
            from rich.live import Live

            self._live = Live(console=self.console, auto_refresh=False, transient=False, vertical_overflow="visible")
            self._live.start()
        self.refresh(now)

    def refresh(self, now: float) -> None:
        if self._live is not None:
            if now - self._last_draw >= _LIVE_MIN_INTERVAL_S:
                self._last_draw = now
                self._live.update(live_renderable(self.source.view(now)), refresh=True)
            return
        lines = []
        for event in self.source.events_after(self._last_event_id):
            lines.append(event_line(event))
            self._last_event_id = event.id
        if lines:  # one write per tick: a tick that starts 300 experiments prints 300 lines at once
            self._write("\n".join(lines))
        if self._last_snapshot is None or now - self._last_snapshot >= self.log_every_s:
            self._last_snapshot = now
            self._write(plain_snapshot(self.source.view(now)))

    def stop(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self._live is not None:
            self._live.update(live_renderable(self.source.view(now)), refresh=True)
            self._live.stop()
            self._live = None
            return
        self._last_snapshot = None  # the final state, whenever the last snapshot was
        self.refresh(now)

    def _write(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)
        self.console.file.flush()  # `tail -f` sees each line as it happens, not at a buffer's whim


def status_table(data: dict[str, Any], now: float | None = None, console: Console | None = None) -> str:
    """`gpupack status`: status_data as one table and a line of counts, states coloured as
    `console` colours them (not at all without one, or off a terminal).

    Laid out by hand as text (columns padded to their widest cell), not a rich Table: a Table
    measures every cell and took 7 s over 10,000 experiments; rich renders only the six states."""
    now = time.time() if now is None else now
    several = len({e["node"] for e in data["experiments"] if e["node"]}) > 1
    today = time.localtime(now)[:3]
    rows = []
    for e in data["experiments"]:
        gpus = _gpu_list(e["gpus"])
        start, end = e["started_at"], e["ended_at"]
        started = ""
        if start is not None:
            started = time.strftime("%H:%M:%S" if time.localtime(start)[:3] == today else "%m-%d %H:%M", time.localtime(start))
        where = (e["node"] or "", gpus) if several else (gpus,)  # "n1,n2": a multi-node one's, in rank order
        rows.append((
            e["name"], e["phase"], e["state"], str(e["attempts"]), *where, started,
            "" if start is None else format_duration((end if end is not None else now) - start),
            "" if e["exit_code"] is None else str(e["exit_code"]), e.get("reason") or "",
        ))
    header = ("experiment", "phase", "state", "tries", *(("node",) if several else ()), "GPUs", "started", "took",
              "exit", "reason")
    right = {3, len(header) - 3, len(header) - 2}  # tries, took, exit
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    widths[2] = max(widths[2], len(INTERRUPTED))

    def cell(i: int, value: str) -> str:
        return value if i == len(header) - 1 else value.rjust(widths[i]) if i in right else value.ljust(widths[i])

    painted: dict[str, str] = {}  # state -> its cell, coloured once

    def state_cell(state: str) -> str:
        if state not in painted:
            painted[state] = cell(2, state)
            if console is not None and console.is_terminal and _STATE_STYLE.get(state):
                from rich.text import Text

                with console.capture() as capture:
                    console.print(Text(state, style=_STATE_STYLE[state]), end="")
                painted[state] = capture.get() + painted[state][len(state):]
        return painted[state]

    lines = [f"{data['run']}: {len(rows)} experiments", "  ".join(cell(i, h) for i, h in enumerate(header)).rstrip(),
             "  ".join("-" * w for w in widths[:-1]) + "  " + "-" * len(header[-1])]
    for r in rows:
        lines.append("  ".join(state_cell(v) if i == 2 else cell(i, v) for i, v in enumerate(r)).rstrip())
    counts = Counter(r[2] for r in rows)
    lines.append(" ".join(f"{state} {counts[state]}" for state in _STATE_STYLE if counts[state]))
    return "\n".join(lines) + "\n"


def _gpu_list(indices: Sequence[int]) -> str:
    """'gpu0,gpu2'; a run of three or more as 'gpu0-3'."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(f"gpu{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(f"gpu{i}" for i in r) for r in runs)
