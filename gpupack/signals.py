"""Stop signals and wake-ups for the engine's loop.

Stop signals (the allocation's USR1 warning, TERM, INT, HUP) become a reason to stop, never a
default-action death; SIGCHLD and every stop signal wake the loop through a self-pipe
(signal.set_wakeup_fd), so a finished experiment is reaped at once instead of at the next poll.
Signals that arrive while gpupack is still starting (imports, manifest, NVML) are remembered by
`catch_stop_signals()` and honoured once the engine installs its own handlers.

The preempt signal that experiments get has one source of truth, `preempt_signal()`: USR2
unless GPUPACK_PREEMPT_SIGNAL (in the scheduler's environment or the manifest's `env`) says
otherwise; the engine sends what `gpupack.job` in the experiment listens for.
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType
from collections.abc import Mapping
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_REASONS: dict[int, str] = {
    signal.SIGUSR1: "allocation ending (USR1)",
    signal.SIGTERM: "terminated (TERM)",
    signal.SIGINT: "interrupted (INT)",
    signal.SIGHUP: "hung up (HUP)",
}
_received_early: list[int] = []

# USR2 by default, like submitit: NCCL installs its own handler on USR1.
DEFAULT_PREEMPT_SIGNAL = signal.SIGUSR2
PREEMPT_SIGNAL_VAR = "GPUPACK_PREEMPT_SIGNAL"


def parse_signal(raw: str) -> signal.Signals:
    """'USR2', 'SIGUSR2' or '12' -> SIGUSR2; ValueError in one line naming the variable."""
    try:
        if raw.isdigit():
            return signal.Signals(int(raw))
        name = raw.upper()
        return signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise ValueError(
            f"{PREEMPT_SIGNAL_VAR}: unknown signal {raw!r} (expected a name like USR2 or a number)"
        ) from None


def preempt_signal(env: Mapping[str, str]) -> signal.Signals:
    """The preempt signal an experiment with this environment gets (and listens for)."""
    raw = env.get(PREEMPT_SIGNAL_VAR, "").strip()
    return parse_signal(raw) if raw else DEFAULT_PREEMPT_SIGNAL


def _remember(signum: int, frame: FrameType | None) -> None:
    _received_early.append(signum)


def catch_stop_signals() -> None:
    """Called first thing by the `gpupack` entry point."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def default_stop_signals() -> None:
    """Commands other than `run` die of stop signals as usual."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)


class StopSignals:
    """The engine's view of signals: `reason` once asked to stop, `count` of stop signals (a
    second one cuts the grace period short), and `sleep()` that any signal interrupts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.count = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self._previous[-1] = signal.set_wakeup_fd(self._wake_w)
        for signum in _received_early:
            self._on_signal(signum, None)
        _received_early.clear()

    def restore(self) -> None:
        if -1 in self._previous:
            signal.set_wakeup_fd(self._previous.pop(-1))
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGCHLD:
            return  # the wake-up fd already woke the loop
        self.count += 1
        if self.reason is None:
            self.reason = _REASONS.get(signum, f"signal {signum}")

    def stop(self, reason: str) -> None:
        """Stop for `reason`, learnt other than by a signal (no count: a second signal still
        cuts the grace period short)."""
        if self.reason is None:
            self.reason = reason

    def sleep(self, timeout_s: float) -> None:
        """Until a signal arrives or timeout_s passes; short naps once stopping."""
        if self.reason is not None:
            timeout_s = min(timeout_s, 0.2)
        try:
            select.select([self._wake_r], [], [], max(0.0, timeout_s))
        except InterruptedError:
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.restore()
        os.close(self._wake_r)
        os.close(self._wake_w)
