"""Stop signals that arrive while gpupack is still starting (imports, manifest, NVML) must not
kill it with the default action: they are remembered and honoured once the engine runs."""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
received: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    received.append(signum)


def catch_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
