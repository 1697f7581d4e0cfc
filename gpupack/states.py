"""The run's states, in one place: an experiment's (what `status --json` says, README) and an
attempt's (what the store records), and how the policy sees an experiment (its queue State).

    pending      waits to start (never ran, retrying, or tried again by a new run)
    running      an attempt runs
    interrupted  its last attempt was stopped (preemption, the scheduler's end): it resumes
    succeeded / failed / skipped (a dependency failed, so it never starts)

The policy knows only its own queue states (policy.State): an interrupted experiment is pending
to it, since it starts again like any other.
"""

from __future__ import annotations

from .policy import State

PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
INTERRUPTED = "interrupted"
SKIPPED = "skipped"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, INTERRUPTED, SKIPPED)
WAITING = (PENDING, INTERRUPTED)  # will start again

# Attempt states: an attempt row exists from the moment before its process is spawned.
A_LAUNCHING = "launching"
A_RUNNING = "running"
A_SUCCEEDED = "succeeded"
A_FAILED = "failed"
A_INTERRUPTED = "interrupted"

_QUEUE = {
    PENDING: State.PENDING,
    INTERRUPTED: State.PENDING,
    RUNNING: State.RUNNING,
    SUCCEEDED: State.SUCCEEDED,
    FAILED: State.FAILED,
    SKIPPED: State.SKIPPED,
}


def queue_state(state: str) -> State:
    """The policy's view of an experiment state."""
    return _QUEUE[state]
