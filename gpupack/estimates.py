"""Budgets and estimates that experience corrects: learned from grid siblings, and raised
after a CUDA out-of-memory failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

OOM_GROWTH = 1.25  # after a CUDA OOM: 1.25x the observed peak (or the budget, if larger)


def oom_budget(budget_bytes: int | None, peak_bytes: int, total_bytes: int) -> int | None:
    """The per-GPU budget to retry a CUDA-OOM experiment with, at most the whole GPU; None when
    it already had the whole GPU (a retry could not do better)."""
    current = budget_bytes if budget_bytes is not None else total_bytes
    raised = min(total_bytes, int(max(peak_bytes, current) * OOM_GROWTH))
    return raised if raised > current else None


class _Attempt(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def ended_at(self) -> float | None: ...


def resumed_time_s(previous: Sequence[_Attempt], interrupted: str = "interrupted") -> float:
    """Wall time of the interrupted attempts at the end of `previous` (oldest first), which the
    next attempt resumes: part of the experiment's duration, not only the resumed tail."""
    total = 0.0
    for a in reversed(previous):
        if a.state != interrupted:
            break
        total += max(0.0, (a.ended_at if a.ended_at is not None else a.started_at) - a.started_at)
    return total


class Learned:
    """Estimates learned from finished attempts of the same template family (grid siblings),
    which share a command shape and so, usually, a duration and a memory footprint.

    Time: the median duration of the family's succeeded experiments replaces the declaration; a
    resumed experiment's duration is the sum of its attempts since it last started afresh.
    Memory: the family's largest observed peak raises the declaration (never lowers it: a
    sibling that used less may have had a smaller grid value)."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}
        self._medians: dict[str, float] = {}  # per family, dropped when a duration is added
        self._peaks: dict[str, int] = {}
        # Bumped whenever an estimate may have changed, overall and per family, so callers can
        # keep what they derived from the families that did not change.
        self.version = 0
        self._versions: dict[str, int] = {}

    def add(self, template: str, duration_s: float | None, peak_bytes: int | None) -> None:
        if duration_s is not None and duration_s >= 0:
            self._times.setdefault(template, []).append(duration_s)
            self._medians.pop(template, None)
            self._changed(template)
        if peak_bytes and peak_bytes > self._peaks.get(template, 0):
            self._peaks[template] = peak_bytes
            self._changed(template)

    def _changed(self, template: str) -> None:
        self.version += 1
        self._versions[template] = self._versions.get(template, 0) + 1

    def family_version(self, template: str) -> int:
        return self._versions.get(template, 0)

    def time_s(self, template: str, declared: float | None) -> float | None:
        median = self._medians.get(template)
        if median is not None:
            return median
        times = self._times.get(template)
        if not times:
            return declared
        # Sorting 10,000 siblings per request per tick dominated a large rerun: once per change.
        ordered = sorted(times)
        median = self._medians[template] = ordered[len(ordered) // 2]
        return median

    def mem_bytes(self, template: str, declared: int | None) -> int | None:
        peak = self._peaks.get(template)
        if peak is None or declared is None:
            return declared  # an unknown need stays "alone on a GPU" until declared
        return max(declared, peak)
