"""Pure placement policy: (experiments, their states, GPU snapshot, occupants, now, time left) -> placements.

No clock, no I/O, no imports of other gpupack modules: the engine (live run) and the simulator
(`gpupack plan`, benchmarks) call the very same `place()` so that a prediction is what a run does.

Rules (DESIGN.md "Inside"):
- Candidates: experiments in state PENDING whose dependencies all SUCCEEDED and whose phase is not
  behind a barrier. A phase with barrier=True opens only when every experiment of all earlier
  phases has ended (SUCCEEDED, FAILED or SKIPPED); like `wait` in a batch script, the barrier
  also holds every later phase, so barrier=False after it does not jump the line.
- Priority: phase order, then critical-path length (own time + the longest chain of not-ended
  dependants' times; unknown time counts 0), then longest estimated time first (unknown time
  goes last among equals), then manifest order. One exception to phase order: a GPU candidate
  whose critical path is at least URGENT_SHARE of the remaining GPU work per GPU (not-ended
  experiments' time x gpus x util, running ones by their time still to go, over all GPUs) goes
  ahead of earlier phases. Such a chain sets the end of the plan wherever it runs; kept behind
  the earlier phases it would start once they are done and finish alone at the end, with the
  other GPUs idle (a 4-hour 2-GPU run in the last phase of a 10-hour plan). The share is below 1
  because a multi-GPU run must wait for GPUs to drain once it becomes urgent.
- A GPU fits a request when: it has no exclusive occupant (and, for an exclusive request, no
  occupant at all); the sum of its occupants' budgets plus the request stays within
  capacity minus headroom; and the live free memory minus headroom minus the not-yet-allocated
  part of its occupants' budgets, max(0, budget - observed), covers the request (the start-up
  race: a job launched a second ago still reads as free). Placements made earlier in the same
  call count as occupants with observed 0. An experiment without a memory estimate (mem_bytes
  None) needs a GPU with no occupant and then holds it alone, like exclusive; an occupant with
  budget None holds its GPU whole. An unknown live reading (None) is not zero: only budgets
  decide, which is safe because a GPU whose occupant's budget is unknown is held whole anyway.
- Multi-GPU requests take all their GPUs on one node (gang). A `nodes: K` request (K > 1) takes
  K whole nodes that are entirely free: on each, `gpus` is the node's GPU count and every GPU has
  no occupant, is not `unavailable` and fits its memory. It holds them whole, like exclusive (so
  does any occupant whose GPUs span nodes). The first K such nodes in snapshot order, in rank
  order; CPU-only occupants do not make a node busy, its CPUs (below) do. Compute first: the
  GPU(s) least oversubscribed once the request joins (utils summing to at most 1 count as not at
  all), since co-located experiments slow each other and an idle GPU beside a crowded one is
  wasted. Then best fit: the GPU(s) whose room left after placement,
  min(budget room, live room) - request, is smallest, so large holes stay for large jobs; ties
  go to the smaller GPU, then snapshot order. CPU-only requests (gpus=0) go to the first node with CPUs free.
- CPUs: when Limits.cpus_per_node gives a node's count, its occupants' cpus plus the request must
  fit; nodes it does not name are not limited.
- Time left: a candidate whose estimate exceeds the allocation's time left waits unless it is
  resumable (it could never finish; a resumable one checkpoints and continues next allocation).
- EASY backfill: the highest-priority candidate that cannot start (the head) gets a reservation:
  the GPUs (and node CPUs) it would take at the earliest time enough occupants have ended, found
  by releasing occupants in order of expected end. Occupants with an unknown end are released
  after every known one, oldest first, and then the start time is unknown (start_s None).
  A lower candidate may start if it ends by the reservation's start (known start and known time
  only), or if the head still fits on its reserved GPUs and node(s) with the candidate added to the
  view at that start; so with an unknown start the reserved GPUs drain instead of feeding a
  stream of small jobs that would starve the head. A head that could not fit even with every
  occupant gone (memory used outside gpupack), or could not finish in the time left when it
  starts, holds no reservation and the next blocked candidate becomes the head.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

# A candidate whose critical path is at least this share of the remaining GPU work per GPU goes
# ahead of earlier phases (see Priority above).
URGENT_SHARE = 0.5

GpuKey = tuple[str, int]  # (node, index of the GPU on that node, as CUDA_VISIBLE_DEVICES counts it)


class State(str, enum.Enum):
    """Queue states the policy reasons about (the engine maps interrupted/retrying to PENDING)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def ended(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.SKIPPED)


@dataclass(frozen=True)
class Request:
    """What one experiment asks for; built by the engine/simulator from manifest.Experiment."""

    name: str
    phase_index: int
    barrier: bool  # the barrier flag of this experiment's phase
    order: int  # position in the expanded manifest
    gpus: int = 1  # 0 = CPU only
    mem_bytes: int | None = None  # per GPU; None = unknown -> needs an empty GPU, alone
    time_s: float | None = None  # estimated wall time; None = unknown
    cpus: int = 1
    exclusive: bool = False
    resumable: bool = False
    depends_on: tuple[str, ...] = ()  # exact experiment names (manifest expands globs)
    phase: str = ""  # phase name, for waiting reasons only
    util: float = 1.0  # share of a GPU's compute it keeps busy alone (0-1)
    nodes: int = 1  # >1: spans that many whole nodes (one rank per node), `gpus` on each
    # Worked out once, as a plan calls place() once per event over the whole queue: all that
    # decides where it fits (requests of one shape fit or fail alike), and its priority when no
    # dependants or urgency reorder it (phase, longest first, unknown time last, manifest order).
    shape: tuple[object, ...] = field(init=False, repr=False, compare=False)
    rank: tuple[object, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (self.gpus, self.mem_bytes, self.exclusive, self.cpus, self.nodes))
        object.__setattr__(self, "rank", (self.phase_index, -(self.time_s or 0.0), self.time_s is None, self.order))

    @property
    def holds_whole(self) -> bool:
        """Nobody may share its GPUs: exclusive, memory unknown, or whole nodes."""
        return self.exclusive or self.mem_bytes is None or self.nodes > 1


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU as read this tick. Unknown readings are None, never 0."""

    node: str
    index: int
    total_bytes: int
    free_bytes: int | None = None  # live reading (NVML / simulated); None = unknown
    util_percent: float | None = None
    uuid: str = ""
    # Non-empty: why nothing new may start here (readings failing, node lost or not heard from);
    # its occupants stay as they are.
    unavailable: str = ""

    @property
    def key(self) -> GpuKey:
        return (self.node, self.index)


@dataclass(frozen=True)
class Occupant:
    """A running experiment as the policy sees it."""

    name: str
    gpus: tuple[GpuKey, ...]
    budget_bytes: int | None  # per GPU; None = holds its GPUs whole
    exclusive: bool = False
    observed_bytes: int = 0  # per GPU memory it is seen using now (0 = not yet allocated)
    cpus: int = 1
    node: str = ""  # node of a CPU-only occupant (gpus == ())
    expected_end_s: float | None = None  # start + estimate; None = unknown
    util: float = 1.0  # share of the GPU's compute it keeps busy


@dataclass(frozen=True)
class Placement:
    name: str
    node: str
    gpus: tuple[int, ...]  # indices on that node; () for CPU-only
    # A nodes>1 request: its nodes in rank order (node == nodes[0]); `gpus` are the indices it
    # uses on EACH of them. Empty for a one-node placement.
    nodes: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[GpuKey, ...]:
        """Every GPU it takes, on all its nodes."""
        return tuple((n, i) for n in (self.nodes or (self.node,)) for i in self.gpus)


@dataclass(frozen=True)
class Reservation:
    """Where and when the blocked head candidate will start (EASY backfill)."""

    name: str
    start_s: float | None  # None: it waits for an occupant whose end is unknown
    gpus: tuple[GpuKey, ...]  # every GPU it holds, on all its nodes
    node: str = ""  # where its CPUs are held (also set for a CPU-only head); the first of `nodes`
    nodes: tuple[str, ...] = ()  # a nodes>1 head: all its nodes in rank order


class Wait(str, enum.Enum):
    """Why a pending experiment does not start, beside the one-line text: what callers act on."""

    BARRIER = "barrier"  # behind a barrier phase
    DEPENDENCY = "dependency"  # a dependency has not succeeded yet
    DEPENDENCY_FAILED = "dependency-failed"  # a dependency failed or was skipped: it never will
    TIME_LEFT = "time-left"  # needs more than the allocation's time left (the next one may have it)
    RESERVED = "reserved"  # it would delay the reservation of the first in line
    RESOURCES = "resources"  # no GPUs, memory or CPUs for it now


@dataclass(frozen=True)
class Decision:
    placements: tuple[Placement, ...]
    waiting: Mapping[str, str] = field(default_factory=dict)  # name -> one-line reason it waits
    reservation: Reservation | None = None
    why: Mapping[str, Wait] = field(default_factory=dict)  # name -> the kind of that reason


@dataclass(frozen=True)
class Limits:
    """Allocation-wide facts the policy needs besides the GPUs."""

    headroom_bytes: int = 0  # kept free on every GPU
    cpus_per_node: Mapping[str, int] | None = None  # None = do not limit by CPUs
    time_left_s: float | None = None  # None = unlimited


# --- working view of one call --------------------------------------------------------------


@dataclass(frozen=True)
class _Claim:
    """An occupant, or a placement of this call, as it loads GPUs and CPUs."""

    gpus: tuple[GpuKey, ...]
    nodes: tuple[str, ...]  # where its CPUs are counted (each node: `cpus`)
    budget_bytes: int | None
    holds: bool  # exclusive or budget unknown: nobody joins its GPUs
    observed_bytes: int
    cpus: int
    end_s: float | None
    util: float = 1.0


@dataclass(eq=False)
class _Gpu:
    key: GpuKey
    pos: int  # snapshot order, the last tie-break
    total_bytes: int
    free_bytes: int | None
    budget_sum: int = 0
    unalloc_sum: int = 0  # budgets not yet seen allocated: still reads as free
    occupants: int = 0
    holders: int = 0
    util_sum: float = 0.0  # compute share its occupants keep busy
    unavailable: str = ""  # GpuSnapshot.unavailable: takes nobody new

    def clone(self) -> _Gpu:
        """A copy (dataclasses.replace costs ten times as much, and a reservation copies every GPU)."""
        other = object.__new__(_Gpu)
        other.__dict__.update(self.__dict__)
        return other

    def load_after(self, req: Request) -> float:
        """How oversubscribed this GPU's compute is once `req` joins: 1 while the utils sum to at
        most 1 (nobody slows down), else their sum (everyone runs at 1/sum)."""
        return round(max(1.0, self.util_sum + req.util), 6)

    def room(self, headroom: int) -> int | None:
        """Bytes a newcomer may take, or None when an occupant holds the GPU whole (or it takes
        nobody new)."""
        if self.holders or self.unavailable:
            return None
        room = self.total_bytes - headroom - self.budget_sum
        if self.free_bytes is not None:
            room = min(room, self.free_bytes - self.unalloc_sum - headroom)
        return room

    def hole_after(self, req: Request, headroom: int) -> int | None:
        """Room left once `req` is placed here (the best-fit key), or None if it does not fit."""
        if self.unavailable or (req.holds_whole and self.occupants):
            return None
        if req.mem_bytes is None:
            return 0
        room = self.room(headroom)
        return None if room is None or room < req.mem_bytes else room - req.mem_bytes


_NO_GPU = _Gpu(("", -1), -1, 0, None)  # stands for "no GPU at all" in the node filter above


class _View:
    """GPUs and node CPUs as loaded by a set of claims; mutated as a call places experiments."""

    def __init__(self, gpus: Sequence[GpuSnapshot], limits: Limits) -> None:
        self.headroom = limits.headroom_bytes
        self.cpu_limit: Mapping[str, int] = limits.cpus_per_node or {}
        self.gpus: dict[GpuKey, _Gpu] = {}
        self.by_node: dict[str, list[_Gpu]] = {}
        for snap in gpus:
            if snap.key not in self.gpus:
                g = _Gpu(snap.key, len(self.gpus), snap.total_bytes, snap.free_bytes, unavailable=snap.unavailable)
                self.gpus[snap.key] = g
                self.by_node.setdefault(snap.node, []).append(g)
        self.nodes = list(self.by_node) + [n for n in self.cpu_limit if n not in self.by_node]
        self.cpu_used: dict[str, int] = dict.fromkeys(self.nodes, 0)
        self._summary: dict[str, tuple[list[int], int]] = {}  # node -> summary(), until a claim there changes

    def copy(self) -> _View:
        other = object.__new__(_View)
        other.headroom, other.cpu_limit, other.nodes = self.headroom, self.cpu_limit, self.nodes
        other.gpus = {k: g.clone() for k, g in self.gpus.items()}
        other.by_node = {n: [other.gpus[g.key] for g in gs] for n, gs in self.by_node.items()}
        other.cpu_used = dict(self.cpu_used)
        other._summary = dict(self._summary)
        return other

    def summary(self, node: str) -> tuple[list[int], int]:
        """(the rooms of its GPUs that take someone, largest first; how many have no occupant and
        take people new): enough to pass over a node that cannot fit a request without looking at
        each GPU again. Many searches of one call fail on the same unchanged nodes."""
        known = self._summary.get(node)
        if known is None:
            gs = self.by_node.get(node, ())
            rooms = sorted((r for g in gs if (r := g.room(self.headroom)) is not None), reverse=True)
            known = self._summary[node] = (rooms, sum(1 for g in gs if not g.occupants and not g.unavailable))
        return known

    def add(self, c: _Claim, sign: int = 1) -> None:
        """Load (sign 1) or release (sign -1) a claim. The live reading already shows what a
        running claim uses, so only a release changes it: its observed memory comes back."""
        for key in c.gpus:
            g = self.gpus.get(key)
            if g is None:  # a GPU that left the inventory
                continue
            g.occupants += sign
            g.holders += sign * c.holds
            g.util_sum += sign * c.util
            if c.budget_bytes is not None:
                g.budget_sum += sign * c.budget_bytes
                g.unalloc_sum += sign * max(0, c.budget_bytes - c.observed_bytes)
            if sign < 0 and g.free_bytes is not None:
                g.free_bytes += c.observed_bytes
            self._summary.pop(key[0], None)
        for node in c.nodes:
            self.cpu_used[node] = self.cpu_used.get(node, 0) + sign * c.cpus

    def cpus_free(self, node: str) -> int | None:
        limit = self.cpu_limit.get(node)
        return None if limit is None else limit - self.cpu_used.get(node, 0)

    def cpus_fit(self, node: str, cpus: int) -> bool:
        free = self.cpus_free(node)
        return free is None or cpus <= free

    def find(
        self,
        req: Request,
        gpu_ok: Callable[[_Gpu], bool] | None = None,
        node_ok: Callable[[str], bool] | None = None,
    ) -> Placement | None:
        """Best-fit placement of `req` on one node (K whole nodes for nodes > 1), or None."""
        nodes = [n for n in self.nodes if self.cpus_fit(n, req.cpus) and (not node_ok or node_ok(n))]
        if req.nodes > 1:
            whole = [n for n in nodes if self._whole(n, req, gpu_ok)]
            if len(whole) < req.nodes:
                return None
            ranks = tuple(whole[: req.nodes])
            return Placement(req.name, ranks[0], tuple(g.key[1] for g in self.by_node[ranks[0]]), ranks)
        if req.gpus == 0:  # not on a node whose GPUs all take nobody new (lost, not heard from)
            nodes = [n for n in nodes if not all(g.unavailable for g in self.by_node.get(n, ()) or [_NO_GPU])]
            return Placement(req.name, nodes[0], ()) if nodes else None
        best: tuple[tuple[float, int, int], str, list[_Gpu]] | None = None
        for node in nodes:
            rooms, empty = self.summary(node)
            if empty < req.gpus if req.holds_whole else len(rooms) < req.gpus or rooms[req.gpus - 1] < (req.mem_bytes or 0):
                continue  # too few GPUs here could take it, whatever gpu_ok says
            fits = []
            for g in self.by_node.get(node, ()):
                hole = g.hole_after(req, self.headroom)
                if hole is not None and (gpu_ok is None or gpu_ok(g)):
                    fits.append((g.load_after(req), hole, g.total_bytes, g.pos, g))
            if len(fits) < req.gpus:
                continue
            fits.sort(key=lambda f: f[:4])
            chosen = fits[: req.gpus]
            score = (sum(f[0] for f in chosen), sum(f[1] for f in chosen), chosen[0][3])
            if best is None or score < best[0]:
                best = (score, node, [f[4] for f in chosen])
        if best is None:
            return None
        return Placement(req.name, best[1], tuple(sorted(g.key[1] for g in best[2])))

    def _whole(self, node: str, req: Request, gpu_ok: Callable[[_Gpu], bool] | None) -> bool:
        """Is `node` entirely free for a nodes > 1 request: exactly `gpus` GPUs, all of them fit?"""
        gs = self.by_node.get(node, ())
        return len(gs) == req.gpus and all(
            g.hole_after(req, self.headroom) is not None and (gpu_ok is None or gpu_ok(g)) for g in gs
        )

    def why_not(self, req: Request) -> str:
        """One line for a user: why `req` does not fit this view."""
        if req.nodes > 1:
            free = [n for n in self.by_node if self._whole(n, req, None)]
            short = [n for n in free if not self.cpus_fit(n, req.cpus)]
            if len(free) >= req.nodes and short:
                return f"needs {req.cpus} CPUs on each of {req.nodes} nodes, {short[0]} has {self.cpus_free(short[0])} free"
            now = f" ({', '.join(free)})" if free else ""
            return f"needs {req.nodes} entirely free nodes of {req.gpus} GPUs; {len(free)} free now{now}"
        if req.gpus == 0:
            if not self.nodes:
                return "no node to run on"
            node = max(self.nodes, key=lambda n: self.cpus_free(n) or 0)
            return f"needs {req.cpus} CPUs (most free: {node} has {self.cpus_free(node)})"
        counts = {
            n: sum(g.hole_after(req, self.headroom) is not None for g in gs) for n, gs in self.by_node.items()
        }
        for node, n in counts.items():
            if n >= req.gpus:  # memory would do: CPUs are what is short
                return f"needs {req.cpus} CPUs on {node}, {self.cpus_free(node)} free"
        mem = _fmt_bytes(req.mem_bytes or 0)
        empty = "memory unknown" if req.mem_bytes is None else "exclusive" if req.exclusive else ""
        if req.gpus > 1:
            node, n = max(counts.items(), key=lambda kv: kv[1], default=("none", 0))
            what = f"{req.gpus} empty GPUs ({empty})" if empty else f"{req.gpus} GPUs with {mem} free"
            return f"needs {what} on one node (best: {node} has {n})"
        if empty:
            return f"needs an empty GPU ({empty}); none is free"
        rooms = [(r, -g.pos, g.key) for g in self.gpus.values() if (r := g.room(self.headroom)) is not None]
        if not rooms:
            return f"no GPU with {mem} free (every GPU is held whole)"
        room, _, key = max(rooms)
        return f"no GPU with {mem} free (best: {self.label(key)} has {_fmt_bytes(max(room, 0))})"

    def label(self, key: GpuKey) -> str:
        return f"gpu{key[1]}" if len(self.by_node) <= 1 else f"{key[0]}:gpu{key[1]}"


def _claim(p: Placement, req: Request, now_s: float) -> _Claim:
    end = None if req.time_s is None else now_s + req.time_s
    return _Claim(p.keys, p.nodes or (p.node,), req.mem_bytes, req.holds_whole, 0, req.cpus, end, req.util)


def _occupant_claim(o: Occupant) -> _Claim:
    # A multi-node occupant uses its CPUs on each of its nodes; a CPU-only one on `node`.
    gpus = o.gpus
    if not gpus:
        nodes: tuple[str, ...] = (o.node,)
    elif len(gpus) == 1 or all(k[0] == gpus[0][0] for k in gpus):  # the common case, made cheaply: every tick
        nodes = (gpus[0][0],)
    else:
        nodes = tuple(dict.fromkeys(k[0] for k in gpus))
    holds = o.exclusive or o.budget_bytes is None or len(nodes) > 1
    return _Claim(o.gpus, nodes, o.budget_bytes, holds, o.observed_bytes, o.cpus, o.expected_end_s, o.util)


@dataclass(eq=False)
class _Hold:
    """The head's reservation within one call, and the view at its start: the claims that end
    by then released, the backfills that outlast it added."""

    head: Request
    res: Reservation
    future: _View
    starts_in: str  # "40m"; "" when the start is unknown

    @property
    def note(self) -> str:
        return f" (starts in {self.starts_in})" if self.starts_in else ""

    def outlasts(self, req: Request, now_s: float) -> bool:
        """Would `req` still run at the reserved start? Unknown start or time: assume so."""
        start, t = self.res.start_s, req.time_s
        return start is None or t is None or now_s + t > start

    def find(self, view: _View, req: Request) -> Placement | None:
        """Best fit for a `req` that outlasts the reservation, on GPUs and a node that leave
        the head fitting on its reserved GPUs at its start."""
        reserved, head, future = set(self.res.gpus), self.head, self.future

        def gpu_ok(g: _Gpu) -> bool:
            if g.key not in reserved:
                return True
            probe = _Claim((g.key,), (), req.mem_bytes, req.holds_whole, 0, 0, None)
            future.add(probe)  # try it on, then take it off again (observed 0: the reading stays)
            try:
                return future.gpus[g.key].hole_after(head, future.headroom) is not None
            finally:
                future.add(probe, -1)

        held = self.res.nodes or (self.res.node,)

        def node_ok(node: str) -> bool:
            return node not in held or future.cpus_fit(node, req.cpus + head.cpus)

        return view.find(req, gpu_ok, node_ok)


def _reserve(
    head: Request, view: _View, claims: Sequence[_Claim], now_s: float, time_left_s: float | None
) -> _Hold | None:
    """The head's reservation, or None if it should hold nothing."""
    future = view.copy()
    known = sorted((c for c in claims if c.end_s is not None), key=lambda c: c.end_s or 0.0)
    steps: list[tuple[float | None, list[_Claim]]] = []
    for c in known:  # release claims ending at the same instant together
        if steps and steps[-1][0] == c.end_s:
            steps[-1][1].append(c)
        else:
            steps.append((c.end_s, [c]))
    steps += [(None, [c]) for c in claims if c.end_s is None]
    tried = False
    for end_s, released in steps:
        for c in released:
            future.add(c, -1)
        # A one-node head that did not fit can only fit now where something was released.
        touched = {n for c in released for n in c.nodes}
        p = future.find(head, node_ok=None if head.nodes > 1 or not tried else touched.__contains__)
        tried = True
        if p is None:
            continue
        if end_s is None:
            return _Hold(head, Reservation(head.name, None, p.keys, p.node, p.nodes), future, "")
        start_s = max(now_s, end_s)  # an overdue occupant may end any moment
        if (
            time_left_s is not None and head.time_s is not None and not head.resumable
            and start_s - now_s + head.time_s > time_left_s
        ):
            return None  # it would be refused for time when its GPUs free up
        res = Reservation(head.name, start_s, p.keys, p.node, p.nodes)
        return _Hold(head, res, future, _fmt_duration(start_s - now_s))
    return None


# --- the policy --------------------------------------------------------------------------------


def place(
    requests: Sequence[Request],
    states: Mapping[str, State],
    gpus: Sequence[GpuSnapshot],
    occupants: Sequence[Occupant],
    now_s: float,
    limits: Limits,
) -> Decision:
    """The experiments to start now, why the other pending ones wait, and the head's reservation.

    `requests` holds every experiment of the run (any state); `states` maps every name to its
    State (a missing name counts as PENDING). Cost: O(requests + dependency edges) to find and
    rank candidates, then O(GPUs) per candidate, with failures cached per request shape (views
    only fill up during a call) so a long queue behind full GPUs costs a dict lookup each.
    """
    waiting: dict[str, str] = {}
    why: dict[str, Wait] = {}
    candidates, live, pending = _candidates(requests, states, waiting, why)
    cp = _critical_paths(live)
    urgent = _urgent(candidates, pending, occupants, cp, len(gpus), now_s)
    if cp or urgent:
        candidates.sort(key=lambda r: (r.name not in urgent, r.phase_index, -cp.get(r.name, r.time_s or 0.0),
                                       r.time_s is None, -(r.time_s or 0.0), r.order))
    else:  # every critical path is its own time: the same order, from keys made once
        candidates.sort(key=lambda r: r.rank)

    view = _View(gpus, limits)
    claims = [_occupant_claim(o) for o in occupants]
    for c in claims:
        view.add(c)
    placements: list[Placement] = []
    failed: dict[tuple[object, ...], str] = {}  # (shape, held back by the reservation) -> reason
    unreservable: set[tuple[object, ...]] = set()
    hold: _Hold | None = None
    left = limits.time_left_s

    for req in candidates:
        if left is not None and req.time_s is not None and req.time_s > left and not req.resumable:
            need, have = _fmt_duration(req.time_s), _fmt_duration(left)
            waiting[req.name] = f"needs {need}, {have} left in the allocation"
            why[req.name] = Wait.TIME_LEFT
            continue
        shape = req.shape
        guard = hold if hold is not None and hold.outlasts(req, now_s) else None
        reason, kind = failed.get((shape, False)), Wait.RESOURCES
        if reason is None and guard:
            reason, kind = failed.get((shape, True)), Wait.RESERVED
        p = None
        if reason is None:
            p = guard.find(view, req) if guard else view.find(req)
            if p is None and guard and view.find(req) is not None:
                reason, kind = f"reserved for {guard.head.name}{guard.note}", Wait.RESERVED
                failed[(shape, True)] = reason
            elif p is None:
                reason = failed[(shape, False)] = view.why_not(req)
                kind = Wait.RESOURCES
        if p is None:
            assert reason is not None
            if hold is None and (shape, req.time_s, req.resumable) not in unreservable:
                hold = _reserve(req, view, claims, now_s, left)
                if hold is None:
                    unreservable.add((shape, req.time_s, req.resumable))
                else:
                    res = hold.res
                    where = f"nodes {', '.join(res.nodes)}" if res.nodes else ", ".join(map(view.label, res.gpus)) or res.node
                    when = f"in {hold.starts_in}" if hold.starts_in else _UNKNOWN_END
                    reason += f"; first in line, holds {where} (free {when})"
            waiting[req.name], why[req.name] = reason, kind
            continue
        c = _claim(p, req, now_s)
        view.add(c)
        claims.append(c)
        if guard:  # still running at the reserved start
            guard.future.add(c)
        placements.append(p)
    return Decision(tuple(placements), waiting, hold.res if hold else None, why)


def _candidates(
    requests: Sequence[Request], states: Mapping[str, State], waiting: dict[str, str], why: dict[str, Wait]
) -> tuple[list[Request], dict[str, Request], list[Request]]:
    """PENDING requests free to start, every not-ended request by name, and every PENDING one;
    the pending ones that may not start get their reason in `waiting`. One pass over `requests`:
    most have ended."""
    pending, running = State.PENDING, State.RUNNING
    live: dict[str, Request] = {}
    waiting_ones: list[Request] = []  # the PENDING ones
    phase_of: dict[int, Request] = {}  # phase -> its first request (barrier flag, name)
    for r in requests:
        if r.phase_index not in phase_of:
            phase_of[r.phase_index] = r
        st = states.get(r.name, pending)
        if st is pending:
            live[r.name] = r
            waiting_ones.append(r)
        elif st is running:
            live[r.name] = r
    unended = Counter(r.phase_index for r in live.values())
    blocked: dict[int, tuple[Request, int]] = {}  # phase -> (the closed barrier's phase, count before it)
    behind, before = None, 0
    for idx in sorted(phase_of):
        if phase_of[idx].barrier:
            behind = (phase_of[idx], before) if before else None
        if behind:
            blocked[idx] = behind
        before += unended[idx]

    out = []
    for r in waiting_ones:
        if not blocked and not r.depends_on:  # most of a large queue: free to start
            out.append(r)
            continue
        if r.phase_index in blocked:
            first, n = blocked[r.phase_index]
            phase = first.phase or f"#{first.phase_index}"
            plural = "s" * (n != 1)
            waiting[r.name] = f"behind the barrier of phase {phase}: {n} earlier experiment{plural} not ended"
            why[r.name] = Wait.BARRIER
            continue
        unmet = [d for d in r.depends_on if states.get(d, pending) is not State.SUCCEEDED]
        if not unmet:
            out.append(r)
            continue
        dead = next((f"dependency {d} {w}" for d in unmet if (w := _ended_badly(states.get(d, pending)))), "")
        more = f" and {len(unmet) - 1} more" if len(unmet) > 1 else ""
        waiting[r.name] = dead or f"waiting for dependency {unmet[0]}{more}"
        why[r.name] = Wait.DEPENDENCY_FAILED if dead else Wait.DEPENDENCY
    return out, live, waiting_ones


def _urgent(
    candidates: Sequence[Request],
    pending: Sequence[Request],
    occupants: Sequence[Occupant],
    cp: Mapping[str, float],
    n_gpus: int,
    now_s: float,
) -> set[str]:
    """GPU candidates whose critical path is at least URGENT_SHARE of the remaining GPU work per
    GPU: they go ahead of earlier phases (module docstring). Unknown times count 0."""
    if not n_gpus:
        return set()
    work = sum((r.time_s or 0.0) * r.gpus * r.nodes * r.util for r in pending if r.gpus)
    work += sum(max(0.0, o.expected_end_s - now_s) * len(o.gpus) * o.util
                for o in occupants if o.expected_end_s is not None)
    floor = URGENT_SHARE * work / n_gpus
    return {r.name for r in candidates if r.gpus and (c := cp.get(r.name, r.time_s or 0.0)) > 0 and c >= floor}


def _critical_paths(live: Mapping[str, Request]) -> dict[str, float]:
    """Own time + longest chain of not-ended dependants' times, for every not-ended request;
    empty when no request depends on another: every path is then its own time (unknown: 0).

    Walks the dependency graph once from its sinks (Kahn), so a 10,000-long chain costs no
    recursion. Members of a cycle (the manifest refuses them) keep their own time.
    """
    if not any(r.depends_on for r in live.values()):  # a sweep
        return {}
    dependants = dict.fromkeys(live, 0)
    for r in live.values():
        for d in r.depends_on:
            if d in dependants:
                dependants[d] += 1
    tail: dict[str, float] = {}
    cp: dict[str, float] = {}
    ready = [n for n, k in dependants.items() if k == 0]
    while ready:
        r = live[ready.pop()]
        cp[r.name] = (r.time_s or 0.0) + tail.get(r.name, 0.0)
        for d in r.depends_on:
            if d in dependants:
                tail[d] = max(tail.get(d, 0.0), cp[r.name])
                dependants[d] -= 1
                if dependants[d] == 0:
                    ready.append(d)
    for name, r in live.items():
        cp.setdefault(name, r.time_s or 0.0)
    return cp


def doomed(requests: Sequence[Request], states: Mapping[str, State]) -> dict[str, str]:
    """PENDING experiments that can never start because a dependency FAILED or was SKIPPED,
    directly or through another doomed one, each with its reason; the engine marks them SKIPPED."""
    pending = State.PENDING
    waiting = [r for r in requests if r.depends_on and states.get(r.name, pending) is pending]
    dependants: dict[str, list[Request]] = {}
    out: dict[str, str] = {}
    cause: dict[str, str] = {}  # doomed name -> the failure at the bottom of its chain
    for r in waiting:
        for d in r.depends_on:
            dependants.setdefault(d, []).append(r)
            if r.name not in out and (why := _ended_badly(states.get(d, pending))):
                out[r.name] = f"dependency {d} {why}"
                cause[r.name] = f"{d} {why}"
    queue = list(out)
    for name in queue:  # breadth first: the shortest chain names the cause
        for r in dependants.get(name, ()):
            if r.name not in out:
                out[r.name] = f"dependency {name} will not run ({cause[name]})"
                cause[r.name] = cause[name]
                queue.append(r.name)
    return out


def unfit_reason(
    request: Request,
    gpus: Sequence[GpuSnapshot],
    headroom_bytes: int,
    cpus_per_node: Mapping[str, int] | None = None,
) -> str | None:
    """Why the request can never run on this inventory, even with every GPU empty, or None."""
    limited = cpus_per_node is not None and all(g.node in cpus_per_node for g in gpus)
    if cpus_per_node and limited and request.cpus > max(cpus_per_node.values()):
        return f"needs {request.cpus} CPUs; the largest node has {max(cpus_per_node.values())}"
    if request.gpus == 0:
        return None
    if not gpus:
        return "no GPU in the allocation"
    need = request.mem_bytes or 0
    biggest = max(g.total_bytes for g in gpus)
    if need > biggest - headroom_bytes:
        minus = f" minus {_fmt_bytes(headroom_bytes)} headroom" if headroom_bytes else ""
        return f"needs {_fmt_bytes(need)} of memory per GPU; the largest GPU holds {_fmt_bytes(biggest)}{minus}"
    if request.nodes > 1:
        counts = Counter(g.node for g in gpus)
        if request.gpus not in counts.values():
            sizes = " or ".join(map(str, sorted(set(counts.values()))))
            return f"nodes: {request.nodes} takes whole nodes: gpus must be {sizes}, the GPUs of a node (or left out)"
        roomy = Counter(g.node for g in gpus if g.total_bytes - headroom_bytes >= need)
        whole = [n for n, k in counts.items() if k == request.gpus and roomy[n] == k]
        if len(whole) < request.nodes:
            with_mem = f" with {_fmt_bytes(need)}" if need else ""
            return f"needs {request.nodes} whole nodes of {request.gpus} GPUs{with_mem}; the allocation has {len(whole)}"
        return None
    per_node = Counter(g.node for g in gpus if g.total_bytes - headroom_bytes >= need)
    most = max(per_node.values())
    if request.gpus > most:
        with_mem = f" with {_fmt_bytes(need)}" if need else ""
        return f"needs {request.gpus} GPUs{with_mem} on one node; the most on any node is {most}"
    return None


def _ended_badly(state: State) -> str:
    """How a dependency ended such that its dependants can never run ("" if it did not)."""
    return "failed" if state is State.FAILED else "was skipped" if state is State.SKIPPED else ""


_UNKNOWN_END = "when an occupant of unknown end finishes"


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"  # GB = 10^9, as the manifest counts


def _fmt_duration(s: float) -> str:
    if s < 120:
        return f"{max(s, 0):.0f}s"
    h, m = divmod(round(s / 60), 60)
    return f"{h}h{m:02d}m" if h and m else f"{h}h" if h else f"{m}m"
