"""Placement policy: table-style cases on hand-built snapshots (sizes in GB = 10^9 bytes).

Each case states the arithmetic that decides it. No processes, no clock: `now` is an argument.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupack import policy
from gpupack.policy import (
    Decision,
    GpuSnapshot,
    Limits,
    Occupant,
    Request,
    State,
    doomed,
    place,
    unfit_reason,
)

GB = 10**9
H = 3600.0


def req(name: str, order: int = 0, mem: float | None = 10, **kw: object) -> Request:
    """A 1-GPU request of `mem` GB in phase 0 unless told otherwise."""
    kw.setdefault("phase_index", 0)
    kw.setdefault("barrier", False)
    mem_bytes = None if mem is None else int(mem * GB)
    return Request(name=name, order=order, mem_bytes=mem_bytes, **kw)  # type: ignore[arg-type]


def gpu(index: int, total: float = 80, free: float | None = -1, node: str = "n0") -> GpuSnapshot:
    """free=-1 (default): the reading shows the whole GPU free; None: no reading."""
    free_bytes = int(total * GB) if free == -1 else None if free is None else int(free * GB)
    return GpuSnapshot(node=node, index=index, total_bytes=int(total * GB), free_bytes=free_bytes)


def occ(
    name: str, *gpus: int | tuple[str, int], budget: float | None = 10, observed: float = 0, **kw: object
) -> Occupant:
    """Running on GPUs given as index (node n0) or (node, index); sizes in GB."""
    keys = tuple(g if isinstance(g, tuple) else ("n0", g) for g in gpus)
    budget_bytes = None if budget is None else int(budget * GB)
    observed_bytes = int(observed * GB)
    return Occupant(name, keys, budget_bytes, observed_bytes=observed_bytes, **kw)  # type: ignore[arg-type]


def decide(
    requests: Sequence[Request],
    gpus: Sequence[GpuSnapshot],
    occupants: Sequence[Occupant] = (),
    states: dict[str, State] | None = None,
    now: float = 0.0,
    **limits: object,
) -> Decision:
    all_states = {r.name: State.PENDING for r in requests}
    all_states.update({o.name: State.RUNNING for o in occupants})
    all_states.update(states or {})
    return place(requests, all_states, gpus, occupants, now, Limits(**limits))  # type: ignore[arg-type]


def placed(d: Decision) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {p.name: (p.node, p.gpus) for p in d.placements}


# --- priority ------------------------------------------------------------------------------------
# One 80 GB GPU and 60 GB requests: 60 + 60 > 80, so exactly one starts and the order shows.


def test_earlier_phase_goes_first_even_if_listed_later() -> None:
    d = decide([req("late", 0, 60, phase_index=1), req("early", 1, 60)], [gpu(0)])
    assert placed(d) == {"early": ("n0", (0,))}


@pytest.mark.parametrize(
    "big_h, tail_h, urgent",
    [
        (4, 0, True),  # 4 h >= half of (8 + 2 x 4) GPU-h over 2 GPUs = 4 h: it would set the end
        (3, 0, False),  # 3 h < half of 14 GPU-h over 2 GPUs = 3.5 h: phase order holds
        (2, 2, True),  # its critical path counts its dependant: 2 + 2 h >= half of 14 / 2
    ],
)
def test_a_later_run_that_would_set_the_end_goes_ahead_of_earlier_phases(big_h: int, tail_h: int, urgent: bool) -> None:
    reqs = [req(f"small{i}", i, 60, time_s=H) for i in range(8)]
    reqs.append(req("big", 8, 60, gpus=2, phase_index=1, time_s=big_h * H))
    if tail_h:
        reqs.append(req("tail", 9, 60, phase_index=2, time_s=tail_h * H, depends_on=("big",)))
    d = decide(reqs, [gpu(0), gpu(1)])
    assert set(placed(d)) == ({"big"} if urgent else {"small0", "small1"})


def test_running_work_counts_toward_the_share_that_makes_a_run_urgent() -> None:
    # 3 GPUs, 8 + 8 GPU-h queued: big (4 h) >= half of 16 / 3 = 2.7 h is urgent. With 10 h still to
    # go on gpu2 it is not: 4 h < half of 26 / 3 = 4.3 h.
    reqs = [req(f"small{i}", i, 60, time_s=H) for i in range(8)]
    reqs.append(req("big", 8, 60, gpus=2, phase_index=1, time_s=4 * H))
    gpus = [gpu(0), gpu(1), gpu(2)]
    idle = decide(reqs, gpus)
    busy = decide(reqs, gpus, [occ("running", 2, budget=60, expected_end_s=10 * H)])
    assert "big" in placed(idle) and "big" not in placed(busy)


@pytest.mark.parametrize(
    "times, winner",
    [
        ((10 * 60, 2 * H, None), "e1"),  # longest estimate first
        ((None, 10 * 60), "e1"),  # unknown time goes last
        ((H, H), "e0"),  # equal: manifest order
        ((None, None), "e0"),
    ],
)
def test_longest_time_first_unknown_last_then_manifest_order(times: tuple[float | None, ...], winner: str) -> None:
    d = decide([req(f"e{i}", i, 60, time_s=t) for i, t in enumerate(times)], [gpu(0)])
    assert [p.name for p in d.placements] == [winner]


def test_manifest_order_not_list_order_breaks_ties() -> None:
    d = decide([req("second", 2, 60, time_s=H), req("first", 1, 60, time_s=H)], [gpu(0)])
    assert [p.name for p in d.placements] == ["first"]


@pytest.mark.parametrize(
    "small_h, busy_h, winner",
    [
        # gpu1 full for 20 h more: 0.2 x (20 + 1 + 5/6) GPU-h / 2 GPUs = 2.2 h, so neither is long;
        # 1 h and 50 min are within a factor of two: the larger footprint (60 GB) goes first.
        (1, 20, "large"),
        (2, 20, "small"),  # 2 h is a longer class than 50 min (and under 0.2 x 22.8 / 2 = 2.3 h)
        # one GPU, nothing else: both are long (>= 0.2 x 1.8 h): longest first.
        (1, 0, "small"),
    ],
)
def test_longer_class_first_then_largest_footprint_unless_long(small_h: int, busy_h: int, winner: str) -> None:
    # 40 + 60 GB > 80: one starts on gpu0, and the order shows.
    reqs = [req("small", 0, 40, time_s=small_h * H), req("large", 1, 60, time_s=50 * 60)]
    gpus, running = [gpu(0)], []
    if busy_h:
        gpus.append(gpu(1))
        running.append(occ("running", 1, budget=80, expected_end_s=busy_h * H))
    d = decide(reqs, gpus, running)
    assert [p.name for p in d.placements] == [winner]


def test_critical_path_beats_a_longer_single_job() -> None:
    # a (1h) feeds c (3h): path 4h; b alone is 2h. Longest-first alone would pick b.
    reqs = [req("a", 0, 60, time_s=H), req("b", 1, 60, time_s=2 * H), req("c", 2, 60, time_s=3 * H, depends_on=("a",))]
    d = decide(reqs, [gpu(0)])
    assert [p.name for p in d.placements] == ["a"]
    assert d.waiting["c"] == "waiting for dependency a"


def test_critical_path_ignores_ended_dependants_and_counts_unknown_as_zero() -> None:
    # c already succeeded (earlier run): a's path is its own 1h < b's 2h. d's time is unknown: adds 0.
    reqs = [
        req("a", 0, 60, time_s=H),
        req("b", 1, 60, time_s=2 * H),
        req("c", 2, 60, time_s=3 * H, depends_on=("a",)),
        req("d", 3, 60, depends_on=("a",)),
    ]
    d = decide(reqs, [gpu(0)], states={"c": State.SUCCEEDED})
    assert [p.name for p in d.placements] == ["b"]


# --- barriers and dependencies --------------------------------------------------------------------


def test_barrier_false_lets_a_later_phase_use_idle_gpus() -> None:
    # gpu0 runs seeds' last experiment (80 GB budget: full); gpu1 is idle.
    for barrier, expect in [(False, {"probe": ("n0", (1,))}), (True, {})]:
        reqs = [req("seed", 0, 10, phase="seeds"), req("probe", 1, 10, phase_index=1, barrier=barrier, phase="probes")]
        d = decide(reqs, [gpu(0), gpu(1)], [occ("seed", 0, budget=80)])
        assert placed(d) == expect
    assert d.waiting["probe"] == "behind the barrier of phase probes: 1 earlier experiment not ended"
    assert d.why == {"probe": policy.Wait.BARRIER}  # the kind, beside the text, is what callers act on


def test_barrier_opens_when_earlier_phases_ended_even_by_failure_and_holds_later_phases() -> None:
    reqs = [
        req("seed", 0),
        req("probe", 1, phase_index=1, barrier=True),
        req("base", 2, phase_index=2),  # barrier=False, but behind probes' barrier like after `wait`
    ]
    d = decide(reqs, [gpu(0)], [occ("seed", 0)])
    assert placed(d) == {}
    assert set(d.waiting) == {"probe", "base"}
    assert d.waiting["base"].startswith("behind the barrier of phase #1")
    d = decide(reqs, [gpu(0)], states={"seed": State.FAILED})
    assert set(placed(d)) == {"probe", "base"}  # 10 + 10 GB on one 80 GB GPU


def test_dependencies_wait_then_start_and_name_the_failure() -> None:
    reqs = [req("train-s1", 0), req("train-s2", 1), req("eval", 2, depends_on=("train-s1", "train-s2"))]
    running = decide(reqs, [gpu(0)], [occ("train-s1", 0)], states={"train-s2": State.PENDING})
    assert running.waiting["eval"] == "waiting for dependency train-s1 and 1 more"
    assert running.why["eval"] is policy.Wait.DEPENDENCY
    done = {"train-s1": State.SUCCEEDED, "train-s2": State.SUCCEEDED}
    assert placed(decide(reqs, [gpu(0)], states=done)) == {"eval": ("n0", (0,))}
    failed = decide(reqs, [gpu(0)], states={"train-s1": State.SUCCEEDED, "train-s2": State.FAILED})
    assert failed.waiting["eval"] == "dependency train-s2 failed"
    assert failed.why["eval"] is policy.Wait.DEPENDENCY_FAILED


def test_doomed_follows_failures_and_skips_transitively() -> None:
    reqs = [
        req("a"), req("b", depends_on=("a",)), req("c", depends_on=("b",)), req("d", depends_on=("c",)),  # a failed
        req("s"), req("t", depends_on=("s",)),  # s skipped -> t
        req("r"), req("u", depends_on=("r",)),  # r still running: u may yet run
        req("v", depends_on=("missing",)),  # unknown dependency counts as pending, not doomed
    ]
    states = {r.name: State.PENDING for r in reqs}
    states.update(a=State.FAILED, s=State.SKIPPED, r=State.RUNNING)
    assert doomed(reqs, states) == {
        "b": "dependency a failed",
        "c": "dependency b will not run (a failed)",
        "d": "dependency c will not run (a failed)",
        "t": "dependency s was skipped",
    }
    states["c"] = State.SUCCEEDED  # already done in an earlier run: not pending, not doomed
    assert set(doomed(reqs, states)) == {"b", "t"}


# --- fit rule -------------------------------------------------------------------------------------


def test_packing_six_30gb_on_two_80gb_gpus_two_per_gpu_never_three() -> None:
    # 30 + 30 = 60 <= 80, 30 * 3 = 90 > 80: two per GPU, two wait.
    d = decide([req(f"e{i}", i, 30) for i in range(6)], [gpu(0), gpu(1)])
    per_gpu = [gpus for _, gpus in placed(d).values()]
    assert sorted(per_gpu) == [(0,), (0,), (1,), (1,)]
    assert set(d.waiting) == {"e4", "e5"}
    assert d.waiting["e5"] == "no GPU with 30.0 GB free (best: gpu0 has 20.0 GB)"


def test_headroom_packs_two_35_not_two_36() -> None:
    # 80 - 10 headroom = 70: 35 + 35 = 70 fits, 36 + 36 = 72 does not.
    assert len(decide([req("a", 0, 35), req("b", 1, 35)], [gpu(0)], headroom_bytes=10 * GB).placements) == 2
    assert len(decide([req("a", 0, 36), req("b", 1, 36)], [gpu(0)], headroom_bytes=10 * GB).placements) == 1


def test_headroom_exact_boundaries() -> None:
    # 80 - 10 headroom = 70: one 70 GB request fits, 71 does not; live 75 - 10 = 65 admits 65, not 66.
    assert len(decide([req("a", 0, 70)], [gpu(0)], headroom_bytes=10 * GB).placements) == 1
    assert len(decide([req("a", 0, 71)], [gpu(0)], headroom_bytes=10 * GB).placements) == 0
    assert len(decide([req("a", 0, 65)], [gpu(0, free=75)], headroom_bytes=10 * GB).placements) == 1
    assert len(decide([req("a", 0, 66)], [gpu(0, free=75)], headroom_bytes=10 * GB).placements) == 0


def test_exclusive_both_ways() -> None:
    # An exclusive request won't join an occupied GPU; nobody joins an exclusive occupant.
    d = decide([req("lat", 0, 10, exclusive=True)], [gpu(0, free=70), gpu(1)], [occ("x", 0)])
    assert placed(d) == {"lat": ("n0", (1,))}
    d = decide([req("lat", 0, 10, exclusive=True)], [gpu(0, free=70)], [occ("x", 0)])
    assert d.waiting["lat"].startswith("needs an empty GPU (exclusive); none is free")
    d = decide([req("small", 0, 1)], [gpu(0, free=70)], [occ("lat", 0, exclusive=True)])
    assert placed(d) == {}


def test_unknown_memory_runs_alone_and_holds_its_gpu() -> None:
    d = decide([req("big", 0, None), req("small", 1, 1)], [gpu(0)])
    assert placed(d) == {"big": ("n0", (0,))}  # then small may not join it: 1 GB on an 80 GB GPU, still no
    d = decide([req("big", 0, None)], [gpu(0, free=70)], [occ("x", 0)])
    assert d.waiting["big"].startswith("needs an empty GPU (memory unknown)")
    d = decide([req("small", 0, 1)], [gpu(0, free=None)], [occ("big", 0, budget=None)])
    assert placed(d) == {}  # budget None holds the GPU whole, reading or not


def test_gang_takes_gpus_on_one_node_never_split() -> None:
    # One free GPU on each node: two free GPUs in all, but not on one node.
    gpus = [gpu(0, node="a"), gpu(1, node="a"), gpu(0, node="b"), gpu(1, node="b")]
    busy = [occ("x", ("a", 0), budget=70), occ("y", ("b", 1), budget=70)]
    d = decide([req("gen", 0, 60, gpus=2)], gpus, busy)
    assert placed(d) == {}
    assert d.waiting["gen"].startswith("needs 2 GPUs with 60.0 GB free on one node (best: a has 1)")
    d = decide([req("gen", 0, 60, gpus=2)], gpus, busy[:1])
    assert placed(d) == {"gen": ("b", (0, 1))}


def test_best_fit_keeps_the_large_hole() -> None:
    # room: gpu0 80 - 30 = 50, gpu1 80 - 50 = 30. A 25 GB job leaves 25 on gpu0 or 5 on gpu1 -> gpu1,
    # so a later 45 GB job still fits on gpu0.
    occupants = [occ("x", 0, budget=30), occ("y", 1, budget=50)]
    d = decide([req("small", 0, 25), req("large", 1, 45)], [gpu(0), gpu(1)], occupants)
    assert placed(d) == {"small": ("n0", (1,)), "large": ("n0", (0,))}


def test_gang_best_fit_prefers_the_tighter_node() -> None:
    # node a: two empty GPUs (holes 80 - 30 = 50 each); node b: two GPUs with 40 GB budgeted (holes 10).
    # util 0.5 + 0.5 <= 1: sharing node b costs no compute, so memory decides.
    gpus = [gpu(0, node="a"), gpu(1, node="a"), gpu(0, node="b"), gpu(1, node="b")]
    d = decide([req("g", 0, 30, gpus=2, util=0.5)], gpus, [occ("x", ("b", 0), ("b", 1), budget=40, util=0.5)])
    assert placed(d) == {"g": ("b", (0, 1))}


def test_compute_first_an_idle_gpu_beats_a_busy_one() -> None:
    # gpu0 runs x (util 1, 20 GB); gpu1 is idle. A util-1 newcomer would halve x's speed on gpu0
    # although best fit by memory (hole 80-20-20=40 < 60) points there: it goes to gpu1.
    d = decide([req("a", 0, 20)], [gpu(0), gpu(1)], [occ("x", 0, budget=20)])
    assert placed(d) == {"a": ("n0", (1,))}
    # Two light experiments (util 0.3 each) share a GPU without slowing each other: best fit.
    d = decide([req("b", 0, 20, util=0.3)], [gpu(0), gpu(1)], [occ("y", 0, budget=20, util=0.3)])
    assert placed(d) == {"b": ("n0", (0,))}
    # Twelve 20 GB util-1 jobs on four 80 GB GPUs: three per GPU, none idle.
    d = decide([req(f"j{i}", i, 20) for i in range(12)], [gpu(i) for i in range(4)])
    per_gpu: dict[int, int] = {}
    for p in d.placements:
        per_gpu[p.gpus[0]] = per_gpu.get(p.gpus[0], 0) + 1
    assert per_gpu == {0: 3, 1: 3, 2: 3, 3: 3}


def test_startup_race_unallocated_budget_still_reads_free() -> None:
    # 20 GB used outside gpupack: reading 60 free. x launched a second ago: budget 40, observed 0.
    # budgets 40 + 30 = 70 <= 80 pass, but live 60 - (40 - 0) = 20 < 30: wait.
    d = decide([req("e", 0, 30)], [gpu(0, free=60)], [occ("x", 0, budget=40, observed=0)])
    assert placed(d) == {}
    assert d.waiting["e"].startswith("no GPU with 30.0 GB free (best: gpu0 has 20.0 GB); first in line")
    # Once x has allocated, the reading shows it: 20 free - 0 unallocated = 20 < 30, still no.
    assert placed(decide([req("e", 0, 30)], [gpu(0, free=20)], [occ("x", 0, budget=40, observed=40)])) == {}
    # The outside user left: 40 free - 0 >= 30.
    assert len(decide([req("e", 0, 30)], [gpu(0, free=40)], [occ("x", 0, budget=40, observed=40)]).placements) == 1


def test_startup_race_within_one_call() -> None:
    # Reading 60 free (20 outside). First 35 fits; the second sees the first as budget 35, observed 0:
    # budgets 70 <= 80, but live 60 - 35 = 25 < 35.
    d = decide([req("a", 0, 35), req("b", 1, 35)], [gpu(0, free=60)])
    assert placed(d) == {"a": ("n0", (0,))}


@pytest.mark.parametrize("budget, fits", [(30, True), (45, False)])
def test_budgets_are_used_as_given(budget: float, fits: bool) -> None:
    # x declared 30 and uses 30; the engine passes 30, or 45 after seeing a 45 GB peak.
    # Reading 50 free, request 40: 30 + 40 = 70 <= 80 fits; 45 + 40 = 85 > 80 does not.
    d = decide([req("e", 0, 40)], [gpu(0, free=50)], [occ("x", 0, budget=budget, observed=30)])
    assert bool(d.placements) is fits


def test_unknown_free_reading_relies_on_budgets() -> None:
    # No reading: 40 + 40 = 80 <= 80 fits; 40 + 41 > 80 does not.
    assert len(decide([req("e", 0, 40)], [gpu(0, free=None)], [occ("x", 0, budget=40)]).placements) == 1
    assert len(decide([req("e", 0, 41)], [gpu(0, free=None)], [occ("x", 0, budget=40)]).placements) == 0


# --- EASY backfill ---------------------------------------------------------------------------------
# Two 80 GB GPUs. x (gpu0) ends at 100 s, y (gpu1) at 1000 s, 40 GB each. Head: 2-GPU, 75 GB each,
# in phase 0; small ones (10 GB) in phase 1. The head can start when both end: reservation at 1000.
# A small one would fit now (40 + 10 <= 80), and 10 + 75 = 85 > 80 at the reservation.


def _easy_world() -> tuple[list[GpuSnapshot], list[Occupant]]:
    return [gpu(0), gpu(1)], [occ("x", 0, budget=40, expected_end_s=100), occ("y", 1, budget=40, expected_end_s=1000)]


def test_reservation_lets_only_jobs_that_end_before_it_backfill() -> None:
    gpus, occupants = _easy_world()
    reqs = [
        req("head", 0, 75, gpus=2, time_s=H),
        req("short", 1, 10, phase_index=1, time_s=900),  # 0 + 900 <= 1000
        req("long", 2, 10, phase_index=1, time_s=1100),  # 1100 > 1000
        req("unknown", 3, 10, phase_index=1),  # no estimate: can't promise to end in time
    ]
    d = decide(reqs, gpus, occupants)
    assert set(placed(d)) == {"short"}
    assert d.reservation is not None and d.reservation.name == "head"
    assert (d.reservation.start_s, d.reservation.gpus) == (1000, (("n0", 0), ("n0", 1)))
    assert d.waiting["long"] == "reserved for head (starts in 16m40s)"
    assert d.waiting["head"].endswith("; first in line, holds gpu0, gpu1 (free in 16m40s)")
    assert d.why == {"long": policy.Wait.RESERVED, "unknown": policy.Wait.RESERVED, "head": policy.Wait.RESOURCES}
    # Without the head, the long one would have started: the reservation is what stops it.
    assert "long" in placed(decide(reqs[1:], gpus, occupants))


def test_backfill_may_use_memory_the_reservation_does_not_need() -> None:
    # Head needs 60 GB each: at 1000 s, 10 (long) + 60 = 70 <= 80, so the long one does not delay it.
    gpus, occupants = _easy_world()
    reqs = [req("head", 0, 60, gpus=2, time_s=H), req("long", 1, 10, phase_index=1, time_s=5 * H)]
    assert set(placed(decide(reqs, gpus, occupants))) == {"long"}


def test_backfill_may_use_gpus_outside_the_reservation() -> None:
    # Head: 1 GPU, 75 GB. gpu0 frees at 100 s -> reserved; gpu1 (y until 1000 s) is not: long goes there.
    # (The head is long enough that `long` is not urgent: 5 h < half of 25 h of work over 2 GPUs.)
    gpus, occupants = _easy_world()
    reqs = [req("head", 0, 75, time_s=20 * H), req("long", 1, 10, phase_index=1, time_s=5 * H)]
    d = decide(reqs, gpus, occupants)
    assert d.reservation is not None and d.reservation.gpus == (("n0", 0),)
    assert placed(d) == {"long": ("n0", (1,))}


def test_unknown_end_reserves_gpus_with_unknown_start() -> None:
    # y's end is unknown: the head (2 GPUs) has no start time; its GPUs drain, even for short jobs.
    gpus = [gpu(0), gpu(1), gpu(2)]
    occupants = [occ("x", 0, budget=40, expected_end_s=100), occ("y", 1, budget=40), occ("z", 2, budget=70)]
    reqs = [req("head", 0, 75, gpus=2, time_s=H), req("short", 1, 10, phase_index=1, time_s=10)]
    d = decide(reqs, gpus, occupants)
    assert d.reservation is not None and d.reservation.start_s is None
    assert d.reservation.gpus == (("n0", 0), ("n0", 1))
    assert placed(d) == {"short": ("n0", (2,))}  # 70 + 10 <= 80 on the unreserved GPU
    assert d.waiting["head"].endswith("(free when an occupant of unknown end finishes)")


def test_head_that_can_never_fit_holds_nothing() -> None:
    # 50 GB used outside gpupack on the only GPU: a 75 GB head can't fit even when x ends; no reservation.
    d = decide(
        [req("head", 0, 75, time_s=H), req("long", 1, 10, phase_index=1, time_s=5 * H)],
        [gpu(0, free=20)],
        [occ("x", 0, budget=10, observed=10, expected_end_s=100)],
    )
    assert d.reservation is None
    assert set(placed(d)) == {"long"}


def test_reservation_holds_the_heads_cpus_too() -> None:
    # n0: 16 CPUs, x holds 6 until 100 s; the head wants 12 (6 + 12 > 16 now; 12 <= 16 at 100 s).
    # Long CPU-only jobs fit now (10 free), but at 100 s 6 + 12 > 16 delays the head, 4 + 12 does not.
    reqs = [
        req("head", 0, 10, cpus=12, time_s=H),
        req("cpu6", 1, None, gpus=0, cpus=6, phase_index=1, time_s=5 * H),
        req("cpu4", 2, None, gpus=0, cpus=4, phase_index=1, time_s=5 * H),
    ]
    d = decide(reqs, [gpu(0)], [occ("x", 0, cpus=6, expected_end_s=100)], cpus_per_node={"n0": 16})
    assert d.reservation is not None and d.reservation.node == "n0"
    assert set(placed(d)) == {"cpu4"}
    assert d.waiting["cpu6"] == "reserved for head (starts in 1m40s)"


def test_overdue_occupant_makes_the_reservation_start_now() -> None:
    # y was expected to end at 1000 s; it is 1500 s now. Head's start: max(now, 1000) = 1500.
    gpus, occupants = _easy_world()
    d = decide([req("head", 0, 75, gpus=2, time_s=H)], gpus, occupants, now=1500.0)
    assert d.reservation is not None and d.reservation.start_s == 1500


def test_head_that_could_not_finish_at_its_start_holds_nothing() -> None:
    # Head (8h, 2 GPUs) starts at 1000 s at the earliest; 1000 + 8h > 1h10m = 4200 s left.
    # So it holds no reservation, and the long one may start; a resumable head would hold one.
    gpus, occupants = _easy_world()
    long = req("long", 1, 10, phase_index=1, time_s=5 * H, resumable=True)
    d = decide([req("head", 0, 75, gpus=2, time_s=8 * H), long], gpus, occupants, time_left_s=4200)
    assert d.reservation is None and set(placed(d)) == {"long"}
    d = decide([req("head", 0, 75, gpus=2, time_s=8 * H, resumable=True), long], gpus, occupants, time_left_s=4200)
    assert d.reservation is not None and placed(d) == {}


def _simulate(
    requests: Sequence[Request], gpus: Sequence[GpuSnapshot], running: Iterable[Occupant]
) -> dict[str, float]:
    """Event loop over place(): budgets only (no readings), jobs end at their estimate. -> start times."""
    by_name = {r.name: r for r in requests}
    occupants = list(running)
    states = {r.name: State.PENDING for r in requests} | {o.name: State.RUNNING for o in occupants}
    starts: dict[str, float] = {}
    now = 0.0
    gpus = [GpuSnapshot(g.node, g.index, g.total_bytes, None) for g in gpus]
    while occupants or any(s is State.PENDING for s in states.values()):
        for p in place(requests, states, gpus, occupants, now, Limits()).placements:
            r = by_name[p.name]
            starts[p.name], states[p.name] = now, State.RUNNING
            occupants.append(Occupant(p.name, p.keys, r.mem_bytes, expected_end_s=now + (r.time_s or 0)))
        now = min(o.expected_end_s or 0 for o in occupants)
        for o in [o for o in occupants if o.expected_end_s == now]:
            occupants.remove(o)
            states[o.name] = State.SUCCEEDED
    return starts


def test_two_gpu_head_is_not_starved_by_a_stream_of_small_ones() -> None:
    # 30 small 1-GPU jobs of 10 GB, 300 s each, queue behind the head. Without a reservation they
    # would fill both GPUs (40 + 4 * 10 = 80) and refill each other's holes forever after. With it,
    # only those that end by 1000 s may start: the head starts at 1000 s, when y ends.
    gpus, occupants = _easy_world()
    smalls = [req(f"s{i}", i + 1, 10, phase_index=1, time_s=300) for i in range(30)]
    starts = _simulate([req("head", 0, 75, gpus=2, time_s=H), *smalls], gpus, occupants)
    assert starts["head"] == 1000
    backfilled = [t for name, t in starts.items() if name != "head" and t < 1000]
    assert backfilled and all(t + 300 <= 1000 for t in backfilled)


# --- nodes: K, whole nodes ------------------------------------------------------------------------
# Nodes of 2 x 80 GB GPUs; a `nodes: 2` request takes 2 GPUs on each of 2 entirely free nodes.


def _nodes(*names: str) -> list[GpuSnapshot]:
    return [gpu(i, node=n) for n in names for i in range(2)]


def test_whole_nodes_go_only_on_entirely_free_nodes_in_rank_order() -> None:
    # a has a 10 GB occupant on gpu1, b a GPU that takes nobody new: only c and d are entirely free.
    gpus = _nodes("a", "b", "c", "d")
    gpus[2] = replace(gpus[2], unavailable="readings failing")
    d = decide([req("ddp", 0, 30, gpus=2, nodes=2)], gpus, [occ("x", ("a", 1))])
    assert [(p.node, p.gpus, p.nodes) for p in d.placements] == [("c", (0, 1), ("c", "d"))]
    assert d.placements[0].keys == (("c", 0), ("c", 1), ("d", 0), ("d", 1))
    # With d busy too, one free node is not enough; the reason says how many are free.
    d = decide([req("ddp", 0, 30, gpus=2, nodes=2)], gpus, [occ("x", ("a", 1)), occ("y", ("d", 0))])
    assert d.waiting["ddp"].startswith("needs 2 entirely free nodes of 2 GPUs; 1 free now (c)")


def test_whole_nodes_are_held_whole_by_the_request_and_as_an_occupant() -> None:
    # Placed in the same call, then as a running occupant: a 10 GB job never joins its GPUs.
    gpus = _nodes("a", "b")
    d = decide([req("ddp", 0, 10, gpus=2, nodes=2), req("small", 1, 10)], gpus)
    assert placed(d) == {"ddp": ("a", (0, 1))} and d.waiting["small"].startswith("no GPU with 10.0 GB free")
    running = Occupant("ddp", (("a", 0), ("a", 1), ("b", 0), ("b", 1)), 10 * GB)
    assert decide([req("small", 1, 10)], gpus, [running]).placements == ()


def test_whole_nodes_hold_a_reservation_and_only_what_ends_before_it_backfills() -> None:
    # x on a ends at 100 s, y on b at 1000 s: the 2-node head can start at 1000 s and holds both
    # nodes; a 900 s job ends in time (0 + 900 <= 1000), a 1100 s one would delay the head.
    gpus = _nodes("a", "b", "c")
    occupants = [occ("x", ("a", 0), expected_end_s=100), occ("y", ("b", 1), expected_end_s=1000),
                 occ("z", ("c", 0), budget=75, expected_end_s=5 * H), occ("w", ("c", 1), budget=75)]
    reqs = [req("ddp", 0, 10, gpus=2, nodes=2, time_s=3 * H), req("short", 1, 10, phase_index=1, time_s=900),
            req("long", 2, 10, phase_index=1, time_s=1100), req("tiny", 3, 5, phase_index=1, time_s=4 * H)]
    d = decide(reqs, gpus, occupants)
    assert d.reservation is not None
    assert (d.reservation.start_s, d.reservation.nodes) == (1000, ("a", "b"))
    assert d.reservation.gpus == (("a", 0), ("a", 1), ("b", 0), ("b", 1))
    assert d.waiting["ddp"].endswith("; first in line, holds nodes a, b (free in 16m40s)")
    # short backfills on a or b; tiny (4 h, 5 GB) goes on c (75 + 5 <= 80), outside the reservation;
    # long (10 GB) does not fit on c (75 + 10 > 80) and may not delay the head.
    assert placed(d)["short"][0] in ("a", "b") and placed(d)["tiny"][0] == "c"
    assert d.waiting["long"] == "reserved for ddp (starts in 16m40s)"


def test_whole_node_head_is_not_starved_by_a_stream_of_small_ones() -> None:
    # Like the 2-GPU case: 40 small jobs (300 s, 10 GB) would keep some GPU of both nodes busy
    # forever; with the reservation the head starts when y ends, at 1000 s.
    gpus = _nodes("a", "b")
    occupants = [occ("x", ("a", 0), expected_end_s=100), occ("y", ("b", 1), expected_end_s=1000)]
    smalls = [req(f"s{i}", i + 1, 10, phase_index=1, time_s=300) for i in range(40)]
    starts = _simulate([req("ddp", 0, 75, gpus=2, nodes=2, time_s=H), *smalls], gpus, occupants)
    assert starts["ddp"] == 1000
    backfilled = [t for name, t in starts.items() if name != "ddp" and t < 1000]
    assert backfilled and all(t + 300 <= 1000 for t in backfilled)
    assert len(starts) == 41


@pytest.mark.parametrize(
    "request_, reason",
    [
        (req("e", 0, 10, gpus=2, nodes=2), None),
        (req("e", 0, 10, gpus=1, nodes=2), "nodes: 2 takes whole nodes: gpus must be 2, the GPUs of a node (or left out)"),
        (req("e", 0, 10, gpus=2, nodes=4), "needs 4 whole nodes of 2 GPUs with 10.0 GB; the allocation has 3"),
        (req("e", 0, None, gpus=2, nodes=3), None),
        (req("e", 0, 45, gpus=2, nodes=3), "needs 3 whole nodes of 2 GPUs with 45.0 GB; the allocation has 2"),
    ],
)
def test_unfit_reason_of_whole_nodes(request_: Request, reason: str | None) -> None:
    # a and b: 2 x 80 GB; c: 2 x 40 GB (45 GB fits a and b only).
    inventory = [*_nodes("a", "b"), gpu(0, 40, node="c"), gpu(1, 40, node="c")]
    assert unfit_reason(request_, inventory, 0) == reason


# --- time left and CPUs ----------------------------------------------------------------------------


def test_time_left_refuses_what_cannot_finish_unless_resumable() -> None:
    reqs = [req("long", 0, 10, time_s=2 * H), req("ckpt", 1, 10, time_s=2 * H, resumable=True), req("unknown", 2, 10)]
    d = decide(reqs, [gpu(0)], time_left_s=H + 600)
    assert set(placed(d)) == {"ckpt", "unknown"}
    assert d.waiting == {"long": "needs 2h00m, 1h10m left in the allocation"}
    assert d.why == {"long": policy.Wait.TIME_LEFT}
    assert decide(reqs[:1], [gpu(0)], time_left_s=2 * H).placements  # exactly enough: starts


def test_cpu_limits() -> None:
    # n0 has 8 CPUs, x uses 6: a 4-CPU GPU job waits (6 + 4 > 8) though the GPU has room.
    gpus = [gpu(0)]
    d = decide([req("e", 0, 10, cpus=4)], gpus, [occ("x", 0, cpus=6)], cpus_per_node={"n0": 8})
    assert d.waiting["e"].startswith("needs 4 CPUs on n0, 2 free; first in line")
    assert decide([req("e", 0, 10, cpus=4)], gpus, [occ("x", 0, cpus=6)]).placements  # no limit given
    # CPU-only jobs go to the first node with CPUs free: n0 has 2 left, n1 (no GPUs) has 16.
    cpu_jobs = [req("c1", 0, None, gpus=0, cpus=2), req("c2", 1, None, gpus=0, cpus=4)]
    d = decide(cpu_jobs, gpus, [occ("x", 0, cpus=6)], cpus_per_node={"n0": 8, "n1": 16})
    assert placed(d) == {"c1": ("n0", ()), "c2": ("n1", ())}


# --- unfit, purity, invariants ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_, reason",
    [
        (req("e", 0, 80), None),
        (req("e", 0, 75), "needs 75.0 GB of memory per GPU; the largest GPU holds 80.0 GB minus 10.0 GB headroom"),
        (req("e", 0, 60, gpus=3), "needs 3 GPUs with 60.0 GB on one node; the most on any node is 2"),
        (req("e", 0, None, gpus=2), None),
        (req("e", 0, None, gpus=0, cpus=64), "needs 64 CPUs; the largest node has 32"),
    ],
)
def test_unfit_reason(request_: Request, reason: str | None) -> None:
    headroom = 0 if request_.mem_bytes == 80 * GB else 10 * GB
    inventory = [gpu(0, node="a"), gpu(1, node="a"), gpu(0, node="b")]
    assert unfit_reason(request_, inventory, headroom, {"a": 32, "b": 32}) == reason


@pytest.mark.parametrize("module", ["policy", "policy_types", "policy_view", "units"])
def test_policy_imports_no_clock_io_or_randomness(module: str) -> None:
    tree = ast.parse((Path(policy.__file__).parent / f"{module}.py").read_text())
    imported, ours = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            ours.add(node.module or "")  # the policy's own parts and units, nothing else of gpupack
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"time", "os", "subprocess", "logging", "random", "datetime", "gpupack"}
    assert imported <= {"__future__", "typing", "dataclasses", "enum", "collections", "math", "itertools", "heapq", "re", "decimal"}
    assert ours <= {"policy_types", "policy_view", "units"}  # units: pure formatting and parsing


_mem = st.one_of(st.none(), st.integers(1, 80))
_time = st.one_of(st.none(), st.integers(0, 4000))
Job = tuple[int | None, int, bool, int | None]  # mem GB, gpus, exclusive, time
Running = tuple[int, int | None, int, int | None]  # GPU position, budget GB, observed GB, end


@settings(max_examples=150, deadline=None)
@given(
    jobs=st.lists(st.tuples(_mem, st.integers(0, 2), st.booleans(), _time), max_size=12),
    running=st.lists(st.tuples(st.integers(0, 3), _mem, st.integers(0, 80), _time), max_size=5),
    frees=st.lists(st.one_of(st.none(), st.integers(0, 80)), min_size=4, max_size=4),
    headroom=st.integers(0, 5),
)
def test_invariants_on_random_worlds(
    jobs: list[Job], running: list[Running], frees: list[int | None], headroom: int
) -> None:
    """Whatever the input: every pending job is placed or has a one-line reason; nothing joins a
    whole-GPU holder; a GPU that gets a newcomer stays within its budgets and its live reading;
    gangs stay on one node; the same input gives the same decision."""
    gpus = [gpu(i % 2, free=f, node=f"n{i // 2}") for i, f in enumerate(frees)]  # 2 nodes x 2 GPUs
    reqs = [req(f"e{i}", i, m, gpus=g, exclusive=x, time_s=t) for i, (m, g, x, t) in enumerate(jobs)]
    occupants = [
        occ(f"r{i}", gpus[k].key, budget=b, observed=o, expected_end_s=e) for i, (k, b, o, e) in enumerate(running)
    ]
    d = decide(reqs, gpus, occupants, headroom_bytes=headroom * GB)
    assert d == decide(reqs, gpus, occupants, headroom_bytes=headroom * GB)
    assert set(placed(d)) | set(d.waiting) == {r.name for r in reqs}
    assert not set(placed(d)) & set(d.waiting)
    assert all(why and "\n" not in why for why in d.waiting.values())

    held = {o.gpus[0] for o in occupants if o.budget_bytes is None}
    budgets = {g.key: sum(o.budget_bytes or 0 for o in occupants if o.gpus[0] == g.key) for g in gpus}
    unalloc = {
        g.key: sum(max(0, (o.budget_bytes or 0) - o.observed_bytes) for o in occupants if o.gpus[0] == g.key)
        for g in gpus
    }
    count = {g.key: sum(o.gpus[0] == g.key for o in occupants) for g in gpus}
    by_name = {r.name: r for r in reqs}
    for p in d.placements:
        r = by_name[p.name]
        assert len(set(p.gpus)) == len(p.gpus) == r.gpus  # one Placement = one node
        for key in ((p.node, i) for i in p.gpus):
            assert key not in held, "joined a GPU held whole"
            assert not (r.holds_whole and count[key]), "whole-GPU request joined an occupied GPU"
            count[key] += 1
            budgets[key] += r.mem_bytes or 0
            unalloc[key] += r.mem_bytes or 0
            if r.holds_whole:
                held.add(key)
    for g in gpus:
        if any(p.node == g.node and g.index in p.gpus for p in d.placements) and g.key not in held:
            assert budgets[g.key] <= g.total_bytes - headroom * GB
            if g.free_bytes is not None:
                assert g.free_bytes - unalloc[g.key] >= headroom * GB


# --- GPUs that take nobody new -------------------------------------------------------------------


def test_an_unavailable_gpu_takes_nobody_new_and_says_nothing_of_its_occupants() -> None:
    down = replace(gpu(0), unavailable="readings failing")
    d = decide([req("a"), req("b")], [down, gpu(1, node="n0")])
    assert placed(d) == {"a": ("n0", (1,)), "b": ("n0", (1,))}
    assert decide([req("a")], [down]).placements == ()


def test_cpu_only_work_avoids_a_node_whose_gpus_are_all_unavailable() -> None:
    lost = [replace(gpu(i, node="n1"), unavailable="node lost") for i in range(2)]
    d = decide([req("cpu", mem=None, gpus=0)], [*lost, gpu(0, node="n2")])
    assert placed(d) == {"cpu": ("n2", ())}


@settings(max_examples=150, deadline=None)
@given(
    jobs=st.lists(st.tuples(_mem, st.integers(1, 2), st.integers(1, 3), _time), max_size=10),
    running=st.lists(st.tuples(st.integers(0, 5), _mem, _time), max_size=4),
    down=st.lists(st.integers(0, 5), max_size=2),
)
def test_whole_node_invariants_on_random_worlds(
    jobs: list[tuple[int | None, int, int, int | None]], running: list[tuple[int, int | None, int | None]],
    down: list[int],
) -> None:
    """3 nodes of 2 GPUs, some GPUs taking nobody new: a `nodes: K` placement takes K distinct
    nodes, every GPU of each, none with an occupant or unavailable GPU, nobody else's in the same
    call; one-node placements never touch them; a reservation of K nodes names all their GPUs."""
    gpus = [gpu(i % 2, node=f"n{i // 2}") for i in range(6)]
    for k in down:
        gpus[k] = replace(gpus[k], unavailable="test")
    reqs = [
        req(f"e{i}", i, m, gpus=2 if k > 1 else g, nodes=k, time_s=t) for i, (m, g, k, t) in enumerate(jobs)
    ]
    occupants = [occ(f"r{i}", gpus[k].key, budget=b, expected_end_s=e) for i, (k, b, e) in enumerate(running)]
    d = decide(reqs, gpus, occupants)
    assert set(placed(d)) | set(d.waiting) == {r.name for r in reqs}
    busy = {o.gpus[0][0] for o in occupants} | {g.node for g in gpus if g.unavailable}
    by_name = {r.name: r for r in reqs}
    for p in d.placements:
        r = by_name[p.name]
        if r.nodes > 1:
            assert len(set(p.nodes)) == r.nodes and p.node == p.nodes[0] and p.gpus == (0, 1)
            assert not set(p.nodes) & busy, "a whole-node run went on a node in use"
            busy |= set(p.nodes)  # and no other whole-node run of this call goes there
        else:
            assert p.nodes == ()
    whole = {n for p in d.placements if by_name[p.name].nodes > 1 for n in p.nodes}
    assert not any(p.node in whole for p in d.placements if by_name[p.name].nodes == 1), "joined a whole node"
    if d.reservation is not None and d.reservation.nodes:
        assert set(d.reservation.gpus) == {(n, i) for n in d.reservation.nodes for i in (0, 1)}
