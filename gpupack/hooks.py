"""What the run loop is given besides GPUs and a launcher: its options and the hooks into the
world it runs in (Slurm or nothing). A leaf: the engine and the Slurm side both import it, so
that slurm_requeue.py can build the engine's hooks without importing the engine."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass
class RunOptions:
    poll_s: float = 5.0
    grace_s: float = 60.0
    headroom_bytes: int = 0
    sample_every_s: float = 5.0
    max_requeues: int = 10


@dataclass
class Hooks:
    """What the engine needs from the world besides GPUs and launching (Slurm or nothing)."""

    time_left: Callable[[float], float | None] = lambda now: None
    requeue: Callable[[], str | None] = lambda: None  # returns what was done, for the log
    cpus_per_node: Mapping[str, int] | None = None
    job_id: str | None = None
    # A new `gpupack run` tries what failed before again (the user may have fixed it); a requeued
    # job does not: its failures used their retries already, another go would only burn GPU time.
    retry_failed: bool = True
