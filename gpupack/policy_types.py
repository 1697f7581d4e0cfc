"""The placement policy's own types: what it is given (requests, GPU snapshots, occupants,
limits) and what it answers (placements, a reservation, waiting reasons). Frozen dataclasses and
enums, built by the engine, the GPU readers and the simulator; the rules that read them are in
policy.py (`place()`), which re-exports every name here. Pure: imports nothing of ours.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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
    # dependants, urgency or length reorder it (phase, then priority() of its own time).
    shape: tuple[object, ...] = field(init=False, repr=False, compare=False)
    rank: tuple[object, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (self.gpus, self.mem_bytes, self.exclusive, self.cpus, self.nodes))
        object.__setattr__(self, "rank", (self.phase_index, *priority(self, self.time_s or 0.0)))

    @property
    def footprint(self) -> float:
        """Memory it takes over all its GPUs (a whole GPU, infinite here, when it holds them)."""
        if not self.gpus:
            return 0.0
        return self.gpus * self.nodes * (math.inf if self.holds_whole else float(self.mem_bytes or 0))

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


def priority(r: Request, path_s: float) -> tuple[object, ...]:
    """Sort key within a phase, given its critical path (own time when nothing depends on it):
    lengths within a factor of two count as alike (the binary exponent), longer classes first;
    within a class the largest footprint first, so that large jobs start while small ones are
    still there to fill the room beside them; then longest first, unknown time last, manifest order."""
    return (-math.frexp(path_s)[1] if path_s > 0 else math.inf, -r.footprint, -path_s, r.time_s is None, r.order)
