"""`gpupack plan`: a discrete-event simulation that drives the very same `policy.place()` as a
run, over estimated durations, to predict the timeline of a manifest on given GPUs.

Model:
- Every experiment takes its `time` estimate when it has its GPUs to itself (unknown: 30 min,
  and the plan says so). Co-located experiments slow each other: on a GPU whose occupants' `util`
  sums above 1, each progresses at 1/sum; a multi-GPU experiment at the rate of its slowest GPU.
- Memory is what budgets say (the live reading equals the budgets): the policy's packing rules
  apply unchanged, as do phases, barriers, dependencies, exclusivity, backfill and time left.

Lower bound (printed beside the makespan; no schedule in this model can beat it):
- util area: a GPU delivers at most one unit of util-work per second (sum of util x rate <= 1),
  and an experiment needs util x time x gpus of it (exclusive or memory-unknown ones block the
  whole GPU: util 1);
- memory area: an experiment holds mem/capacity of each of its GPUs for at least its time, and
  budgets never exceed capacity (exclusive or memory-unknown: the whole GPU);
- critical path: dependencies and barriers chained, each experiment at full speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from . import policy
from .engine import request_for
from .gpus import GpuInfo
from .manifest import Experiment, Manifest
from .policy import GpuKey, Occupant, State
from .units import format_bytes, format_duration

DEFAULT_TIME_S = 1800.0
_EPS = 1e-6


@dataclass
class _Running:
    exp: Experiment
    gpus: tuple[GpuKey, ...]
    node: str
    start_s: float
    work_left_s: float  # seconds of work at full speed
    budget: int | None


@dataclass
class Planned:
    name: str
    phase: str
    start_s: float | None = None
    end_s: float | None = None
    gpus: tuple[GpuKey, ...] = ()
    why_not: str | None = None  # never started: the policy's reason


@dataclass
class Plan:
    experiments: list[Planned]
    inventory: list[GpuInfo]
    makespan_s: float
    lower_bound_s: float
    bounds: dict[str, float]
    busy_fraction: float
    time_limit_s: float | None
    assumed_time: list[str] = field(default_factory=list)  # no time estimate: DEFAULT_TIME_S used

    @property
    def fits(self) -> bool:
        unfinished = any(p.end_s is None for p in self.experiments)
        late = self.time_limit_s is not None and self.makespan_s > self.time_limit_s + _EPS
        return not unfinished and not late


def _duration(exp: Experiment) -> float:
    return exp.time_s if exp.time_s is not None else DEFAULT_TIME_S


def _rates(running: dict[str, _Running]) -> dict[str, float]:
    load: dict[GpuKey, float] = {}
    for r in running.values():
        for key in r.gpus:
            load[key] = load.get(key, 0.0) + r.exp.util
    return {
        name: min((1.0 / max(1.0, load[k]) for k in r.gpus), default=1.0) for name, r in running.items()
    }


def simulate(
    manifest: Manifest, inventory: Sequence[GpuInfo], time_limit_s: float | None = None, headroom_bytes: int = 0
) -> Plan:
    exps = list(manifest.experiments)
    requests = [request_for(e, e.mem_bytes, _duration(e)) for e in exps]
    by_name = {e.name: e for e in exps}
    planned = {e.name: Planned(e.name, e.phase) for e in exps}
    states: dict[str, State] = {e.name: State.PENDING for e in exps}
    running: dict[str, _Running] = {}
    busy: dict[GpuKey, float] = {g.key: 0.0 for g in inventory}
    now = 0.0
    while True:
        used: dict[GpuKey, int] = {g.key: 0 for g in inventory}
        for r in running.values():
            for key in r.gpus:
                used[key] += r.budget if r.budget is not None else next(g.total_bytes for g in inventory if g.key == key)
        snaps = [policy.GpuSnapshot(g.node, g.index, g.total_bytes, max(0, g.total_bytes - used[g.key])) for g in inventory]
        rates = _rates(running)
        occupants = [
            Occupant(
                name, r.gpus, r.budget, r.exp.exclusive, observed_bytes=r.budget or 0, cpus=r.exp.cpus, node=r.node,
                expected_end_s=now + r.work_left_s / rates[name], util=r.exp.util,
            )
            for name, r in running.items()
        ]
        limits = policy.Limits(
            headroom_bytes=headroom_bytes,
            time_left_s=None if time_limit_s is None else max(0.0, time_limit_s - now),
        )
        decision = policy.place(requests, states, snaps, occupants, now, limits)
        for p in decision.placements:
            exp = by_name[p.name]
            keys = tuple((p.node, i) for i in p.gpus)
            running[p.name] = _Running(exp, keys, p.node, now, _duration(exp), exp.mem_bytes)
            states[p.name] = State.RUNNING
            planned[p.name].start_s, planned[p.name].gpus = now, keys
        if not running:
            for name, why in decision.waiting.items():
                planned[name].why_not = why
            break
        rates = _rates(running)
        step = min(r.work_left_s / rates[n] for n, r in running.items())
        for key in {k for r in running.values() for k in r.gpus}:
            busy[key] += step
        now += step
        for name in list(running):
            r = running[name]
            r.work_left_s -= rates[name] * step
            if r.work_left_s <= _EPS * max(1.0, _duration(r.exp)):
                del running[name]
                states[name] = State.SUCCEEDED
                planned[name].end_s = now
    makespan = max((p.end_s for p in planned.values() if p.end_s is not None), default=0.0)
    bounds = lower_bounds(exps, inventory)
    busy_fraction = sum(busy.values()) / (len(inventory) * makespan) if makespan and inventory else 0.0
    return Plan(
        list(planned.values()), list(inventory), makespan, max(bounds.values(), default=0.0), bounds,
        busy_fraction, time_limit_s, [e.name for e in exps if e.time_s is None],
    )


def lower_bounds(exps: Sequence[Experiment], inventory: Sequence[GpuInfo]) -> dict[str, float]:
    """The three bounds of the module docstring, in seconds."""
    n_gpus = len(inventory)
    capacity = max((g.total_bytes for g in inventory), default=1)
    util_area = mem_area = 0.0
    for e in exps:
        if e.gpus == 0:
            continue
        whole = e.exclusive or e.mem_bytes is None
        t = _duration(e) * e.gpus
        util_area += t * (1.0 if whole else e.util)
        mem_area += t * (1.0 if whole else min(1.0, (e.mem_bytes or 0) / capacity))
    return {
        "util_area_s": util_area / n_gpus if n_gpus else math.inf,
        "memory_area_s": mem_area / n_gpus if n_gpus else math.inf,
        "critical_path_s": critical_path(exps),
    }


def critical_path(exps: Sequence[Experiment]) -> float:
    """Earliest finish of everything with unlimited GPUs: dependencies and barriers chained (a
    barrier phase, and every phase after it, starts when all earlier phases have ended)."""
    by_phase: dict[int, list[Experiment]] = {}
    for e in exps:
        by_phase.setdefault(e.phase_index, []).append(e)
    by_name = {e.name: e for e in exps}
    gates: dict[int, float] = {}
    finish: dict[str, float] = {}

    def earliest_finish(e: Experiment, seen: frozenset[str]) -> float:
        if e.name not in finish:
            start = gates.get(e.phase_index, 0.0)  # not known yet: 0, which keeps the bound valid
            for dep in e.depends_on:
                d = by_name.get(dep)
                if d is not None and d.name not in seen:
                    start = max(start, earliest_finish(d, seen | {e.name}))
            finish[e.name] = start + _duration(e)
        return finish[e.name]

    gate = latest = 0.0
    for index in sorted(by_phase):
        if any(e.barrier for e in by_phase[index]):
            gate = latest
        gates[index] = gate
        for e in by_phase[index]:
            latest = max(latest, earliest_finish(e, frozenset()))
    return latest


# --- plan_data / render ------------------------------------------------------------------------


def plan_data(manifest: Manifest, inventory: Sequence[GpuInfo], time_limit_s: float | None = None) -> dict[str, Any]:
    """The prediction as data: `plan --json` prints this, `render_plan` draws it."""
    plan = simulate(manifest, inventory, time_limit_s)
    phases: dict[str, dict[str, Any]] = {}
    for p in plan.experiments:
        ph = phases.setdefault(p.phase, {"name": p.phase, "start_s": None, "end_s": None, "experiments": 0})
        ph["experiments"] += 1
        if p.start_s is not None:
            ph["start_s"] = p.start_s if ph["start_s"] is None else min(ph["start_s"], p.start_s)
        if p.end_s is not None:
            ph["end_s"] = p.end_s if ph["end_s"] is None else max(ph["end_s"], p.end_s)
    return {
        "run": manifest.name,
        "gpus": [{"node": g.node, "index": g.index, "total_bytes": g.total_bytes} for g in inventory],
        "makespan_s": plan.makespan_s,
        "lower_bound_s": plan.lower_bound_s,
        "bounds": plan.bounds,
        "busy_fraction": plan.busy_fraction,
        "time_limit_s": plan.time_limit_s,
        "fits": plan.fits,
        "assumed_time": plan.assumed_time,
        "phases": list(phases.values()),
        "experiments": [
            {
                "name": p.name, "phase": p.phase, "start_s": p.start_s, "end_s": p.end_s,
                "gpus": [k[1] for k in p.gpus], "node": p.gpus[0][0] if p.gpus else None,
                "late": plan.time_limit_s is not None and p.end_s is not None and p.end_s > plan.time_limit_s + _EPS,
                "why_not": p.why_not,
            }
            for p in plan.experiments
        ],
    }


def lanes(data: dict[str, Any], width: int = 72) -> list[str]:
    """One text line per GPU: each column a slice of the makespan, lettered by the phase that
    occupies it (upper case: more than one experiment shares the GPU), '.' idle."""
    makespan = data["makespan_s"] or 1.0
    letters = {ph["name"]: "abcdefghijklmnopqrstuvwxyz"[i % 26] for i, ph in enumerate(data["phases"])}
    rows = []
    for g in data["gpus"]:
        cells = []
        for col in range(width):
            t = (col + 0.5) * makespan / width
            here = [
                e for e in data["experiments"]
                if e["start_s"] is not None and e["end_s"] is not None and e["node"] == g["node"]
                and g["index"] in e["gpus"] and e["start_s"] <= t < e["end_s"]
            ]
            if not here:
                cells.append(".")
            else:
                letter = letters[here[0]["phase"]]
                cells.append(letter.upper() if len(here) > 1 else letter)
        label = f"gpu{g['index']}" if len({x["node"] for x in data["gpus"]}) <= 1 else f"{g['node']}:gpu{g['index']}"
        rows.append(f"{label:>8} |{''.join(cells)}|")
    legend = ", ".join(f"{letter}={name}" for name, letter in letters.items())
    rows.append(f"{'':>8}  0{format_duration(makespan):>{width}}")
    rows.append(f"{'':>8}  phases: {legend} (upper case: shared GPU)")
    return rows


def render_plan(data: dict[str, Any], console: Console) -> None:
    gpus = data["gpus"]
    sizes = ", ".join(sorted({format_bytes(g["total_bytes"]) for g in gpus}))
    console.print(f"{data['run']}: {len(data['experiments'])} experiments on {len(gpus)} GPUs ({sizes})", highlight=False)
    table = Table(box=None, pad_edge=False)
    for col in ("phase", "experiments", "start", "end"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for ph in data["phases"]:
        table.add_row(ph["name"], str(ph["experiments"]), format_duration(ph["start_s"]), format_duration(ph["end_s"]))
    console.print(table)
    for line in lanes(data, width=min(72, max(20, console.width - 14))):
        console.print(line, highlight=False, markup=False)
    b = data["bounds"]
    everything_ran = all(e["end_s"] is not None for e in data["experiments"])
    ratio = (
        f": {data['makespan_s'] / data['lower_bound_s']:.2f}x the bound"
        if everything_ran and data["lower_bound_s"] else ""
    )
    console.print(
        f"makespan {format_duration(data['makespan_s'])}; lower bound {format_duration(data['lower_bound_s'])} "
        f"(util area {format_duration(b['util_area_s'])}, memory area {format_duration(b['memory_area_s'])}, "
        f"critical path {format_duration(b['critical_path_s'])}){ratio}; GPUs busy {data['busy_fraction']:.0%}",
        highlight=False,
    )
    if data["assumed_time"]:
        n = len(data["assumed_time"])
        console.print(f"{n} experiment(s) have no time estimate: {format_duration(DEFAULT_TIME_S)} assumed", highlight=False)
    if data["time_limit_s"] is not None:
        late = [e for e in data["experiments"] if e["late"]]
        never = [e for e in data["experiments"] if e["start_s"] is None]
        verdict = "fits" if data["fits"] else "does NOT fit"
        console.print(f"{verdict} in {format_duration(data['time_limit_s'])}", highlight=False)
        for e in never[:20]:
            console.print(f"  would not start: {e['name']}: {e['why_not'] or 'no room'}", highlight=False, markup=False)
        for e in late[:20]:
            console.print(f"  would not end in time (resumable, continues after a requeue): {e['name']}", highlight=False, markup=False)
