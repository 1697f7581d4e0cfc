"""Stop signals and wake-ups for the engine's loop.

Stop signals (the allocation's USR1 warning, TERM, INT, HUP) become a reason to stop, never a
default-action death; SIGCHLD and every stop signal wake the loop through a self-pipe
(signal.set_wakeup_fd), so a finished experiment is reaped at once instead of at the next poll.
Signals that arrive while gpupack is still starting (imports, manifest, NVML) are remembered by
`catch_stop_signals()` and honoured once the engine installs its own handlers.
"""

from __future__ import annotations

import os
import select
import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_REASONS: dict[int, str] = {
    signal.SIGUSR1: "allocation ending (USR1)",
    signal.SIGTERM: "terminated (TERM)",
    signal.SIGINT: "interrupted (INT)",
    signal.SIGHUP: "hung up (HUP)",
}
_received_early: list[int] = []


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
