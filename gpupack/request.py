"""An experiment's spec as the placement policy's `Request`: the one translation that both the
engine (with learned budgets and times) and `simulate`/`plan` (with the declared ones) use, so
that a plan and a run ask the policy the same question."""

from __future__ import annotations

from . import policy
from .manifest import Experiment


def request_for(e: Experiment, mem_bytes: int | None, time_s: float | None = None) -> policy.Request:
    return policy.Request(
        name=e.name, phase_index=e.phase_index, phase=e.phase, barrier=e.barrier, order=e.order, gpus=e.gpus,
        mem_bytes=mem_bytes, time_s=e.time_s if time_s is None else time_s, cpus=e.cpus, exclusive=e.exclusive,
        resumable=e.resumable, depends_on=e.depends_on, util=e.util, nodes=e.nodes,
    )
