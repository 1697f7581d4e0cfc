"""The working view of one `policy.place()` call: GPUs and node CPUs as loaded by the occupants
and by the placements the call has made so far, the best-fit search over it (`View.find`), the
one-line reason a request does not fit (`View.why_not`), and the head's reservation for EASY
backfill (`reserve`, `Hold`). The rules it implements are written once, in policy.py's docstring.
Pure: no clock, no I/O; it imports only the policy's types.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .policy_types import GpuKey, GpuSnapshot, Limits, Occupant, Placement, Request, Reservation
from .units import format_duration  # pure too: the one way gpupack writes a duration

@dataclass(frozen=True)
class Claim:
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
class GpuLoad:
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

    def clone(self) -> GpuLoad:
        """A copy (dataclasses.replace costs ten times as much, and a reservation copies every GPU)."""
        other = object.__new__(GpuLoad)
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


_NO_GPU = GpuLoad(("", -1), -1, 0, None)  # stands for "no GPU at all" in the node filter above


class View:
    """GPUs and node CPUs as loaded by a set of claims; mutated as a call places experiments."""

    def __init__(self, gpus: Sequence[GpuSnapshot], limits: Limits) -> None:
        self.headroom = limits.headroom_bytes
        self.cpu_limit: Mapping[str, int] = limits.cpus_per_node or {}
        self.gpus: dict[GpuKey, GpuLoad] = {}
        self.by_node: dict[str, list[GpuLoad]] = {}
        for snap in gpus:
            if snap.key not in self.gpus:
                g = GpuLoad(snap.key, len(self.gpus), snap.total_bytes, snap.free_bytes, unavailable=snap.unavailable)
                self.gpus[snap.key] = g
                self.by_node.setdefault(snap.node, []).append(g)
        self.nodes = list(self.by_node) + [n for n in self.cpu_limit if n not in self.by_node]
        self.cpu_used: dict[str, int] = dict.fromkeys(self.nodes, 0)
        self._summary: dict[str, tuple[list[int], int]] = {}  # node -> summary(), until a claim there changes

    def copy(self) -> View:
        other = object.__new__(View)
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

    def add(self, c: Claim, sign: int = 1) -> None:
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
        gpu_ok: Callable[[GpuLoad], bool] | None = None,
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
        best: tuple[tuple[float, int, int], str, list[GpuLoad]] | None = None
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

    def _whole(self, node: str, req: Request, gpu_ok: Callable[[GpuLoad], bool] | None) -> bool:
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
        mem = fmt_bytes(req.mem_bytes or 0)
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
        return f"no GPU with {mem} free (best: {self.label(key)} has {fmt_bytes(max(room, 0))})"

    def label(self, key: GpuKey) -> str:
        return f"gpu{key[1]}" if len(self.by_node) <= 1 else f"{key[0]}:gpu{key[1]}"


def placement_claim(p: Placement, req: Request, now_s: float) -> Claim:
    end = None if req.time_s is None else now_s + req.time_s
    return Claim(p.keys, p.nodes or (p.node,), req.mem_bytes, req.holds_whole, 0, req.cpus, end, req.util)


def occupant_claim(o: Occupant) -> Claim:
    # A multi-node occupant uses its CPUs on each of its nodes; a CPU-only one on `node`.
    gpus = o.gpus
    if not gpus:
        nodes: tuple[str, ...] = (o.node,)
    elif len(gpus) == 1 or all(k[0] == gpus[0][0] for k in gpus):  # the common case, made cheaply: every tick
        nodes = (gpus[0][0],)
    else:
        nodes = tuple(dict.fromkeys(k[0] for k in gpus))
    holds = o.exclusive or o.budget_bytes is None or len(nodes) > 1
    return Claim(o.gpus, nodes, o.budget_bytes, holds, o.observed_bytes, o.cpus, o.expected_end_s, o.util)


@dataclass(eq=False)
class Hold:
    """The head's reservation within one call, and the view at its start: the claims that end
    by then released, the backfills that outlast it added."""

    head: Request
    res: Reservation
    future: View
    starts_in: str  # "40m"; "" when the start is unknown

    @property
    def note(self) -> str:
        return f" (starts in {self.starts_in})" if self.starts_in else ""

    def outlasts(self, req: Request, now_s: float) -> bool:
        """Would `req` still run at the reserved start? Unknown start or time: assume so."""
        start, t = self.res.start_s, req.time_s
        return start is None or t is None or now_s + t > start

    def find(self, view: View, req: Request) -> Placement | None:
        """Best fit for a `req` that outlasts the reservation, on GPUs and a node that leave
        the head fitting on its reserved GPUs at its start."""
        reserved, head, future = set(self.res.gpus), self.head, self.future

        def gpu_ok(g: GpuLoad) -> bool:
            if g.key not in reserved:
                return True
            probe = Claim((g.key,), (), req.mem_bytes, req.holds_whole, 0, 0, None)
            future.add(probe)  # try it on, then take it off again (observed 0: the reading stays)
            try:
                return future.gpus[g.key].hole_after(head, future.headroom) is not None
            finally:
                future.add(probe, -1)

        held = self.res.nodes or (self.res.node,)

        def node_ok(node: str) -> bool:
            return node not in held or future.cpus_fit(node, req.cpus + head.cpus)

        return view.find(req, gpu_ok, node_ok)


def reserve(
    head: Request, view: View, claims: Sequence[Claim], now_s: float, time_left_s: float | None
) -> Hold | None:
    """The head's reservation, or None if it should hold nothing."""
    future = view.copy()
    known = sorted((c for c in claims if c.end_s is not None), key=lambda c: c.end_s or 0.0)
    steps: list[tuple[float | None, list[Claim]]] = []
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
            return Hold(head, Reservation(head.name, None, p.keys, p.node, p.nodes), future, "")
        start_s = max(now_s, end_s)  # an overdue occupant may end any moment
        if (
            time_left_s is not None and head.time_s is not None and not head.resumable
            and start_s - now_s + head.time_s > time_left_s
        ):
            return None  # it would be refused for time when its GPUs free up
        res = Reservation(head.name, start_s, p.keys, p.node, p.nodes)
        return Hold(head, res, future, format_duration(start_s - now_s))
    return None


def fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"  # GB = 10^9, as the manifest counts

