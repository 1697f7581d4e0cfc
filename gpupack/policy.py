"""Pure placement policy: (experiments, their states, GPU snapshot, occupants, now, time left) -> placements.

No clock, no I/O, no imports of other gpupack modules but its own parts (policy_types.py: the types,
policy_view.py: the working view of one call) and units.py (pure: how gpupack writes a duration): the engine (live run) and the simulator
(`gpupack plan`, benchmarks) call the very same `place()` so that a prediction is what a run does.

Rules (README "How it places experiments"):
- Candidates: experiments in state PENDING whose dependencies all SUCCEEDED and whose phase is not
  behind a barrier. A phase with barrier=True opens only when every experiment of all earlier
  phases has ended (SUCCEEDED, FAILED or SKIPPED); like `wait` in a batch script, the barrier
  also holds every later phase, so barrier=False after it does not jump the line.
- Priority: phase order; within a phase, first the long candidates, whose critical path (own
  time + the longest chain of not-ended dependants' times; unknown time counts 0) is at least
  LONG_SHARE of the remaining GPU work per GPU (not-ended experiments' time x gpus x util,
  running ones by their time still to go, over all GPUs), longest first: started late they
  would end alone. Then the others by critical path within a factor of two (power-of-two
  classes), longer classes first, and within a class the largest memory footprint first (memory
  x GPUs; holding GPUs whole counts as most), then the longest, unknown time last, manifest
  order. Starting large jobs while small ones are left to fill the room beside them is what
  keeps a GPU from running one 70 GB job alone at the end; longest first alone lost 5-7% of the
  makespan on mixed memory (benchmarks/README.md "A drawn mix"). One exception to phase order: a
  GPU candidate whose critical path is at least URGENT_SHARE of the remaining GPU work per GPU
  goes ahead of earlier phases. Such a chain sets the end of the plan wherever it runs; kept
  behind the earlier phases it would start once they are done and finish alone at the end, with
  the other GPUs idle (a 4-hour 2-GPU run in the last phase of a 10-hour plan). The share is
  below 1 because a multi-GPU run must wait for GPUs to drain once it becomes urgent.
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

from collections import Counter
from collections.abc import Mapping, Sequence

from .policy_types import (  # re-exported: the policy's types are imported from here
    Decision as Decision,
    GpuKey as GpuKey,
    GpuSnapshot as GpuSnapshot,
    Limits as Limits,
    Occupant as Occupant,
    Placement as Placement,
    Request as Request,
    Reservation as Reservation,
    State as State,
    Wait as Wait,
    priority,
)
from .policy_view import Hold, View, fmt_bytes, occupant_claim, placement_claim, reserve
from .units import format_duration

# A candidate whose critical path is at least this share of the remaining GPU work per GPU goes
# ahead of earlier phases (see Priority above).
URGENT_SHARE = 0.5
# A candidate whose critical path is at least this share of it goes first in its phase: near the
# end of a plan the long ones lead, longest first (see Priority above).
LONG_SHARE = 0.2


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
    per_gpu, longest = _work_per_gpu(pending, occupants, len(gpus), now_s)
    # Without dependants a critical path is its own time: none is urgent unless the longest is.
    urgent_floor = URGENT_SHARE * per_gpu
    urgent = _urgent(candidates, cp, urgent_floor) if gpus and (cp or 0 < urgent_floor <= longest) else set()
    floor = LONG_SHARE * per_gpu
    if cp or urgent or 0 < floor <= longest:
        def key(r: Request) -> tuple[object, ...]:
            c = cp.get(r.name, r.time_s or 0.0)
            first = (r.name not in urgent, r.phase_index)
            return first + ((False, -c, -r.footprint, r.order) if 0 < floor <= c else (True, *priority(r, c)))
        candidates.sort(key=key)
    else:  # every critical path is its own time and none is long: the same order, from keys made once
        candidates.sort(key=lambda r: r.rank)

    view = View(gpus, limits)
    claims = [occupant_claim(o) for o in occupants]
    for c in claims:
        view.add(c)
    placements: list[Placement] = []
    failed: dict[tuple[object, ...], str] = {}  # (shape, held back by the reservation) -> reason
    unreservable: set[tuple[object, ...]] = set()
    hold: Hold | None = None
    left = limits.time_left_s

    for req in candidates:
        if left is not None and req.time_s is not None and req.time_s > left and not req.resumable:
            need, have = format_duration(req.time_s), format_duration(left)
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
                hold = reserve(req, view, claims, now_s, left)
                if hold is None:
                    unreservable.add((shape, req.time_s, req.resumable))
                else:
                    res = hold.res
                    where = f"nodes {', '.join(res.nodes)}" if res.nodes else ", ".join(map(view.label, res.gpus)) or res.node
                    when = f"in {hold.starts_in}" if hold.starts_in else _UNKNOWN_END
                    reason += f"; first in line, holds {where} (free {when})"
            waiting[req.name], why[req.name] = reason, kind
            continue
        c = placement_claim(p, req, now_s)
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


def _work_per_gpu(
    pending: Sequence[Request], occupants: Sequence[Occupant], n_gpus: int, now_s: float
) -> tuple[float, float]:
    """The remaining GPU work per GPU (module docstring, Priority; unknown times count 0) and the
    longest pending GPU request's time: none is long unless that one is (one pass, no key each)."""
    if not n_gpus:
        return 0.0, 0.0
    work = longest = 0.0
    for r in pending:
        t = r.time_s
        if t and r.gpus:
            work += t * r.gpus * r.nodes * r.util
            if t > longest:
                longest = t
    work += sum(max(0.0, o.expected_end_s - now_s) * len(o.gpus) * o.util
                for o in occupants if o.expected_end_s is not None)
    return work / n_gpus, longest


def _urgent(candidates: Sequence[Request], cp: Mapping[str, float], floor: float) -> set[str]:
    """GPU candidates whose critical path is at least `floor` (URGENT_SHARE of the remaining GPU
    work per GPU): they go ahead of earlier phases (module docstring). Unknown times count 0."""
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
        minus = f" minus {fmt_bytes(headroom_bytes)} headroom" if headroom_bytes else ""
        return f"needs {fmt_bytes(need)} of memory per GPU; the largest GPU holds {fmt_bytes(biggest)}{minus}"
    if request.nodes > 1:
        counts = Counter(g.node for g in gpus)
        if request.gpus not in counts.values():
            sizes = " or ".join(map(str, sorted(set(counts.values()))))
            return f"nodes: {request.nodes} takes whole nodes: gpus must be {sizes}, the GPUs of a node (or left out)"
        roomy = Counter(g.node for g in gpus if g.total_bytes - headroom_bytes >= need)
        whole = [n for n, k in counts.items() if k == request.gpus and roomy[n] == k]
        if len(whole) < request.nodes:
            with_mem = f" with {fmt_bytes(need)}" if need else ""
            return f"needs {request.nodes} whole nodes of {request.gpus} GPUs{with_mem}; the allocation has {len(whole)}"
        return None
    per_node = Counter(g.node for g in gpus if g.total_bytes - headroom_bytes >= need)
    most = max(per_node.values())
    if request.gpus > most:
        with_mem = f" with {fmt_bytes(need)}" if need else ""
        return f"needs {request.gpus} GPUs{with_mem} on one node; the most on any node is {most}"
    return None


def _ended_badly(state: State) -> str:
    """How a dependency ended such that its dependants can never run ("" if it did not)."""
    return "failed" if state is State.FAILED else "was skipped" if state is State.SKIPPED else ""


_UNKNOWN_END = "when an occupant of unknown end finishes"
