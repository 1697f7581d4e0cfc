"""`gpupack plan`: a discrete-event simulation that drives the very same `policy.place()` as a
run, over estimated durations, and predicts the timeline of a manifest on given GPUs.

Same code path as a run with `--gpus`: requests come from `request.request_for` (an unknown time
stays unknown to the policy), the GPUs are read through `SimulatedProbe` (an occupant uses exactly
its budget, the whole GPU when its memory is unknown), and occupants carry what the engine gives
them (expected end = start + estimate). Only the clock is simulated: events are experiment ends.

Model:
- An experiment alone on its GPUs takes its `time` estimate (none: DEFAULT_TIME_S, and the plan
  says so). Co-located experiments slow each other: on a GPU whose occupants' `util` sums above
  1, each progresses at 1/sum; a multi-GPU experiment at the rate of its slowest GPU. Rates are
  recomputed at every event, and what is left of each experiment is work, not wall time.
- With a time limit, the policy sees time_left = limit - now (as under Slurm) and nothing
  starts at or after the limit; what runs past it is late (resumable: continues after a requeue).

Lower bound (`lower_bound`; no schedule in this model can beat it, whatever the policy):
- Segments: a barrier phase starts a new segment, which starts only after every earlier
  experiment has ended, so the makespan is at least the sum over segments of their own bounds.
- Util area: a GPU delivers at most one unit of util-work per second (occupants' sum of util x
  rate is at most 1), and an experiment needs util x time on each of its GPUs (exclusive,
  memory-unknown or whole nodes: 1 x time, nobody shares it). Area / GPUs bounds the segment.
- Memory area: an experiment holds mem / capacity (capacity = the largest GPU) of each of its
  GPUs for at least its time, and budgets on a GPU never sum above capacity (exclusive or
  memory-unknown: the whole GPU).
- Critical path: dependency chains at full speed within the segment.
- Energy (release and tail): an experiment cannot start before head = its longest chain of
  dependencies, nor end later than makespan - tail (its longest chain of dependants), so for any
  t and tau the experiments with head >= t and tail >= tau, if there are any, put their area inside
  [t, makespan - tau]: makespan >= t + tau + area / GPUs. Tried at up to _ENERGY_CUTS values each.
Each holds for any schedule, since durations at full speed are the shortest possible. The bound
ignores how memory and util combine on one GPU (a 70 GB, util 0.3 job leaves compute idle that
no other job can use), so plans mixing large memory with low util stay some way above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import policy
from .gpus import GpuInfo as GpuInfo  # re-exported: the API's GPU description
from .gpus import SimulatedProbe
from .gpus import parse_gpu_spec as parse_gpu_spec  # re-exported: GPUs from a --gpus spec
from .manifest import Experiment, Manifest
from .policy import GpuKey, Occupant, State
from .request import request_for
from .units import format_bytes, format_duration

if TYPE_CHECKING:  # rich is imported by render_plan alone: `plan --json` does not draw
    from rich.console import Console

# Part of gpupack's Python API (README "Python API"): these names are kept stable; `lanes` and
# `render_plan` draw `gpupack plan` and are not.
__all__ = [
    "DEFAULT_TIME_S", "MAX_EXPERIMENTS", "Bound", "GpuInfo", "Plan", "Planned", "duration_s", "lower_bound",
    "parse_gpu_spec", "plan_data", "simulate",
]

DEFAULT_TIME_S = 1800.0  # an experiment without a time estimate, in the simulation only
_EPS = 1e-6
# Every event calls place() over every experiment not yet ended, so a plan costs about the
# square of its size: 10,000 experiments take 8 s on a 2-core machine, 100,000 would take
# some fifteen minutes. Above this `plan` refuses in one line instead (benchmarks/README.md).
MAX_EXPERIMENTS = 10_000
_ENERGY_CUTS = 32


@dataclass
class _Running:
    exp: Experiment
    gpus: tuple[GpuKey, ...]
    node: str
    start_s: float
    work_left_s: float  # seconds of work at full speed
    budget_bytes: int | None
    occupant: Occupant | None = None  # made again only when its reading changes (every event reads)


@dataclass
class Planned:
    name: str
    phase: str
    start_s: float | None = None
    end_s: float | None = None
    gpus: tuple[GpuKey, ...] = ()
    why_not: str | None = None  # never started: the policy's reason


@dataclass(frozen=True)
class Bound:
    """The lower bound and its parts (module docstring), in seconds."""

    lower_bound_s: float
    util_area_s: float
    memory_area_s: float
    critical_path_s: float
    segments: int  # barrier segments, whose bounds add up


@dataclass
class Plan:
    experiments: list[Planned]
    inventory: list[GpuInfo]
    makespan_s: float
    bound: Bound
    busy_fraction: float  # GPU-seconds with an occupant / (GPUs x makespan)
    time_limit_s: float | None
    assumed_time: list[str] = field(default_factory=list)  # no time estimate: DEFAULT_TIME_S used

    @property
    def fits(self) -> bool:
        late = self.time_limit_s is not None and self.makespan_s > self.time_limit_s + _EPS
        return not late and all(p.end_s is not None for p in self.experiments)


def duration_s(exp: Experiment) -> float:
    """How long `exp` runs alone on its GPUs in the simulation: its `time`, else DEFAULT_TIME_S."""
    return exp.time_s if exp.time_s is not None else DEFAULT_TIME_S


def _rates(running: Mapping[str, _Running]) -> dict[str, float]:
    load: dict[GpuKey, float] = {}
    for r in running.values():
        for key in r.gpus:
            load[key] = load.get(key, 0.0) + r.exp.util
    return {name: min((1.0 / max(1.0, load[k]) for k in r.gpus), default=1.0) for name, r in running.items()}


def _occupant(name: str, r: _Running, observed_bytes: int | None = None) -> Occupant:
    """What the engine's `_occupants` makes of a running experiment; None: any reading (the
    simulated probe looks only at GPUs, budget and util)."""
    o = r.occupant
    if o is None or (observed_bytes is not None and o.observed_bytes != observed_bytes):
        end = None if r.exp.time_s is None else r.start_s + r.exp.time_s
        o = r.occupant = Occupant(
            name, r.gpus, r.budget_bytes, r.exp.exclusive, observed_bytes=observed_bytes or 0, cpus=r.exp.cpus,
            node=r.node, expected_end_s=end, util=r.exp.util,
        )
    return o


def simulate(
    manifest: Manifest, inventory: Sequence[GpuInfo], time_limit_s: float | None = None, headroom_bytes: int = 0
) -> Plan:
    """The timeline of `manifest` on `inventory` (see the module docstring for the model), placed
    by policy.place() as a run would; with `time_limit_s`, the allocation ends then."""
    exps = list(manifest.experiments)
    by_name = {e.name: e for e in exps}
    # In priority order when nothing reorders them: place() sorts its candidates every call, and
    # a list already in order costs one comparison per element (it still sorts a list in any order).
    requests = sorted((request_for(e, e.mem_bytes) for e in exps), key=lambda r: r.rank)
    probe = SimulatedProbe(inventory)
    planned = {e.name: Planned(e.name, e.phase) for e in exps}
    states: dict[str, State] = dict.fromkeys(by_name, State.PENDING)
    running: dict[str, _Running] = {}
    waiting: Mapping[str, str] = {}
    busy_s = now = 0.0
    cut = False  # the allocation ended with experiments still pending
    while True:
        if time_limit_s is None or now < time_limit_s - _EPS:
            reading = probe.read({n: _occupant(n, r) for n, r in running.items()})
            occupants = [_occupant(n, r, max(reading.usage.get(n, {}).values(), default=0)) for n, r in running.items()]
            left = None if time_limit_s is None else time_limit_s - now
            # Ended requests change nothing in place() (their states say it), so they are left
            # out: each call then costs what is still to do, not the whole plan.
            requests = [r for r in requests if states[r.name] is not State.SUCCEEDED]  # the only end here
            decision = policy.place(
                requests, states, reading.gpus, occupants, now, policy.Limits(headroom_bytes, None, left)
            )
            waiting = decision.waiting
            for p in decision.placements:
                exp, keys = by_name[p.name], p.keys
                running[p.name] = _Running(exp, keys, p.node, now, duration_s(exp), exp.mem_bytes)
                states[p.name] = State.RUNNING
                planned[p.name].start_s, planned[p.name].gpus = now, keys
        else:
            cut = cut or any(s is State.PENDING for s in states.values())
        if not running:
            break
        rates = _rates(running)
        step = min(r.work_left_s / rates[n] for n, r in running.items())
        busy_s += step * len({k for r in running.values() for k in r.gpus})
        now += step
        for name in list(running):
            r = running[name]
            r.work_left_s -= rates[name] * step
            if r.work_left_s <= _EPS * max(1.0, duration_s(r.exp)):
                del running[name]
                states[name] = State.SUCCEEDED
                planned[name].end_s = now
    for name, state in states.items():
        if state is State.PENDING:
            why = waiting.get(name, "could not be placed")
            planned[name].why_not = f"the allocation ends first (last: {why})" if cut else why
    makespan = max((p.end_s for p in planned.values() if p.end_s is not None), default=0.0)
    busy = busy_s / (len(inventory) * makespan) if makespan and inventory else 0.0
    return Plan(
        list(planned.values()), list(inventory), makespan, lower_bound(exps, inventory), busy, time_limit_s,
        [e.name for e in exps if e.time_s is None],
    )


# --- the lower bound ---------------------------------------------------------------------------


def lower_bound(exps: Sequence[Experiment], inventory: Sequence[GpuInfo]) -> Bound:
    """The bound of the module docstring: per barrier segment the largest of util area, memory
    area, critical path and energy; the segments' bounds summed."""
    n_gpus = len(inventory)
    capacity = max((g.total_bytes for g in inventory), default=1)
    segments: list[list[Experiment]] = []
    last_phase = None
    for e in sorted(exps, key=lambda e: (e.phase_index, e.order)):
        if not segments or (e.phase_index != last_phase and e.barrier):
            segments.append([])
        segments[-1].append(e)
        last_phase = e.phase_index
    total = util_total = mem_total = cp_total = 0.0
    for seg in segments:
        head, tail = _chains(seg)
        areas = {e.name: _areas(e, capacity) for e in seg}
        util = sum(a[0] for a in areas.values()) / n_gpus if n_gpus else 0.0
        mem = sum(a[1] for a in areas.values()) / n_gpus if n_gpus else 0.0
        cp = max(head[e.name] + duration_s(e) + tail[e.name] for e in seg)
        energy = _energy(seg, head, tail, areas, n_gpus) if n_gpus else 0.0
        total += max(util, mem, cp, energy)
        util_total, mem_total, cp_total = util_total + util, mem_total + mem, cp_total + cp
    return Bound(total, util_total, mem_total, cp_total, len(segments))


def _areas(e: Experiment, capacity: int) -> tuple[float, float]:
    """GPU-seconds of util and of memory share the experiment needs at least."""
    if e.gpus == 0:
        return 0.0, 0.0
    t = duration_s(e) * e.gpus * e.nodes
    if e.exclusive or e.nodes > 1 or e.mem_bytes is None:
        return t, t
    return t * e.util, t * min(1.0, e.mem_bytes / capacity)


def _chains(seg: Sequence[Experiment]) -> tuple[dict[str, float], dict[str, float]]:
    """Per experiment: the longest chain of its dependencies (head) and of its dependants (tail)
    within the segment, at full speed. Kahn's order: no recursion on long chains."""
    by_name = {e.name: e for e in seg}
    deps = {e.name: [d for d in e.depends_on if d in by_name] for e in seg}
    users: dict[str, list[str]] = {n: [] for n in by_name}
    for name, ds in deps.items():
        for d in ds:
            users[d].append(name)
    indegree = {n: len(ds) for n, ds in deps.items()}
    order = [n for n, k in indegree.items() if k == 0]
    for name in order:  # grows while it is walked
        for u in users[name]:
            indegree[u] -= 1
            if indegree[u] == 0:
                order.append(u)
    head = dict.fromkeys(by_name, 0.0)
    tail = dict.fromkeys(by_name, 0.0)
    for name in order:
        for u in users[name]:
            head[u] = max(head[u], head[name] + duration_s(by_name[name]))
    for name in reversed(order):
        for d in deps[name]:
            tail[d] = max(tail[d], tail[name] + duration_s(by_name[name]))
    return head, tail


def _cuts(values: Sequence[float]) -> list[float]:
    distinct = sorted(set(values))
    if len(distinct) <= _ENERGY_CUTS:
        return distinct
    return sorted({distinct[i * (len(distinct) - 1) // (_ENERGY_CUTS - 1)] for i in range(_ENERGY_CUTS)})


def _energy(
    seg: Sequence[Experiment], head: Mapping[str, float], tail: Mapping[str, float],
    areas: Mapping[str, tuple[float, float]], n_gpus: int,
) -> float:
    """max over t, tau of t + tau + area(head >= t, tail >= tau) / GPUs (module docstring)."""
    by_head = sorted(seg, key=lambda e: -head[e.name])
    best = 0.0
    for tau in _cuts([tail[e.name] for e in seg]):
        util = mem = 0.0
        inside = 0  # an empty set says nothing: nothing has to fit between t and makespan - tau
        for i, e in enumerate(by_head):
            if tail[e.name] >= tau:
                util, mem, inside = util + areas[e.name][0], mem + areas[e.name][1], inside + 1
            if inside and (i + 1 == len(by_head) or head[by_head[i + 1].name] < head[e.name]):
                best = max(best, head[e.name] + tau + max(util, mem) / n_gpus)
    return best


# --- plan_data / render ------------------------------------------------------------------------


def plan_data(manifest: Manifest, inventory: Sequence[GpuInfo], time_limit_s: float | None = None) -> dict[str, Any]:
    """The prediction as data: `plan --json` prints this, `render_plan` draws it. When the plan
    does not fit the limit, `needs_s` is the makespan of the same plan without one."""
    plan = simulate(manifest, inventory, time_limit_s)
    limit = time_limit_s
    needs = None
    if limit is not None and not plan.fits:
        needs = simulate(manifest, inventory).makespan_s
    phases: dict[str, dict[str, Any]] = {}
    for p in plan.experiments:
        ph = phases.setdefault(p.phase, {"name": p.phase, "experiments": 0, "start_s": None, "end_s": None})
        ph["experiments"] += 1
        if p.start_s is not None:
            ph["start_s"] = min(p.start_s, ph["start_s"] if ph["start_s"] is not None else math.inf)
        if p.end_s is not None:
            ph["end_s"] = max(p.end_s, ph["end_s"] or 0.0)
    b = plan.bound
    return {
        "run": manifest.name,
        "gpus": [{"node": g.node, "index": g.index, "total_bytes": g.total_bytes} for g in inventory],
        "makespan_s": plan.makespan_s,
        "lower_bound_s": b.lower_bound_s,
        "bounds": {
            "util_area_s": b.util_area_s, "memory_area_s": b.memory_area_s,
            "critical_path_s": b.critical_path_s, "segments": b.segments,
        },
        "busy_fraction": plan.busy_fraction,
        "time_limit_s": limit,
        "fits": plan.fits,
        "needs_s": needs,
        "default_time_s": DEFAULT_TIME_S,
        "assumed_time": plan.assumed_time,
        "phases": list(phases.values()),
        "experiments": [
            {
                "name": p.name, "phase": p.phase, "start_s": p.start_s, "end_s": p.end_s,
                "gpus": sorted({k[1] for k in p.gpus}), "node": p.gpus[0][0] if p.gpus else None,
                "nodes": list(dict.fromkeys(k[0] for k in p.gpus)),
                "late": limit is not None and p.end_s is not None and p.end_s > limit + _EPS,
                "resumable": e.resumable, "why_not": p.why_not,
            }
            for p, e in zip(plan.experiments, manifest.experiments)
        ],
    }


def lanes(data: Mapping[str, Any], width: int = 72) -> list[str]:
    """One text line per GPU: each column a slice of the makespan, lettered by the phase of the
    experiment running in its middle (upper case: the GPU is shared then), '.' idle."""
    makespan = data["makespan_s"] or 1.0
    letters = {ph["name"]: "abcdefghijklmnopqrstuvwxyz"[i % 26] for i, ph in enumerate(data["phases"])}
    one_node = len({g["node"] for g in data["gpus"]}) <= 1
    rows = []
    for g in data["gpus"]:
        mine = [
            e for e in data["experiments"]
            if e["end_s"] is not None and g["node"] in e["nodes"] and g["index"] in e["gpus"]
        ]
        cells = []
        for col in range(width):
            t = (col + 0.5) * makespan / width
            here = [e for e in mine if e["start_s"] <= t < e["end_s"]]
            letter = letters[here[0]["phase"]] if here else "."
            cells.append(letter.upper() if len(here) > 1 else letter)
        label = f"gpu{g['index']}" if one_node else f"{g['node']}:gpu{g['index']}"
        rows.append(f"{label:>8} |{''.join(cells)}|")
    rows.append(f"{'':>8}  0{format_duration(makespan):>{width}}")
    legend = ", ".join(f"{letter}={name}" for name, letter in letters.items())
    rows.append(f"{'':>8}  {legend}; upper case: shared, '.': idle")
    return rows


def render_plan(data: Mapping[str, Any], console: Console) -> None:
    from rich.table import Table

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    gpus, rows = data["gpus"], data["experiments"]
    sizes = ", ".join(sorted({format_bytes(g["total_bytes"]) for g in gpus}))
    nodes = len({g["node"] for g in gpus})
    where = f"{len(gpus)} GPUs" + (f" of {nodes} nodes" if nodes > 1 else "")
    say(f"{data['run']}: {len(rows)} experiments on {where} ({sizes})")
    table = Table(box=None, pad_edge=False)
    for col in ("phase", "experiments", "start", "end"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for ph in data["phases"]:
        table.add_row(ph["name"], str(ph["experiments"]), format_duration(ph["start_s"]), format_duration(ph["end_s"]))
    console.print(table)
    for line in lanes(data, width=min(72, max(20, console.width - 14))):
        say(line)
    b, bound = data["bounds"], data["lower_bound_s"]
    everything_ran = all(e["end_s"] is not None for e in rows)
    ratio = f", {data['makespan_s'] / bound:.2f}x the bound" if everything_ran and bound else ""
    parts = (
        f"util area {format_duration(b['util_area_s'])}, memory area {format_duration(b['memory_area_s'])}, "
        f"critical path {format_duration(b['critical_path_s'])}"
        + (f", summed over {b['segments']} barrier segments" if b["segments"] > 1 else "")
    )
    say(
        f"makespan {format_duration(data['makespan_s'])} (lower bound {format_duration(bound)}: {parts}){ratio}; "
        f"GPUs busy {data['busy_fraction']:.0%}"
    )
    if data["assumed_time"]:
        say(f"{len(data['assumed_time'])} experiment(s) without a time estimate: {format_duration(data['default_time_s'])} assumed")
    limit = data["time_limit_s"]
    if limit is None:
        return
    if data["fits"]:
        say(f"fits in {format_duration(limit)}")
        return
    say(f"does NOT fit in {format_duration(limit)}: the whole plan needs {format_duration(data['needs_s'])}")
    for e in [e for e in rows if e["start_s"] is None][:20]:
        say(f"  would not start: {e['name']}: {e['why_not']}")
    for e in [e for e in rows if e["late"]][:20]:
        then = "resumable: continues after a requeue" if e["resumable"] else "killed at the end"
        say(f"  would not end in time: {e['name']} (ends at {format_duration(e['end_s'])}; {then})")
