"""Helpers for experiment code: what an experiment sees under gpupack (README "What an experiment sees").

gpupack starts every experiment with these variables; outside gpupack they are absent and
each helper falls back to something sensible, so a script runs the same by hand:

    GPUPACK_OUT       the experiment's own directory, stable across attempts (checkpoints)
    GPUPACK_RESUME    "1" when an earlier attempt was interrupted
    GPUPACK_ATTEMPT   1, 2, ... counted across every run of the run directory
    GPUPACK_PREEMPT_SIGNAL  optional override of the preempt signal (name or number)

Typical use in a training script:

    stop = threading.Event()
    job.on_preempt(stop.set)                  # SIGUSR2 (or the override) and SIGTERM
    state = job.load_checkpoint(ckpt) if job.resuming() else None
    for step in ...:
        ...
        if stop.is_set():
            job.save_checkpoint(state, ckpt)
            raise SystemExit(128 + job.preempt_signal())
    job.write_results({"accuracy": acc}, out / "results.json")

Everything here is atomic where others read: a file is written to a temporary file in the
same directory, fsynced, then renamed over the target, so a reader (or a resumed attempt
after a kill) sees the old file or the new one, never half of one. Only the standard library
is imported at module level; torch is imported by the checkpoint helpers alone.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .files import atomic_path as atomic_path  # re-exported for experiments
from .signals import DEFAULT_PREEMPT_SIGNAL as DEFAULT_PREEMPT_SIGNAL  # re-exported for experiments
from .signals import preempt_signal as _preempt_signal_of

# The API for experiment code (README "Python API"): these names are kept stable.
__all__ = [
    "DEFAULT_PREEMPT_SIGNAL", "atomic_path", "attempt", "load_checkpoint", "on_preempt", "out_dir",
    "preempt_signal", "preempt_signals", "resuming", "save_checkpoint", "write_results",
]

_received: signal.Signals | None = None


def out_dir(explicit: str | Path | None = None) -> Path:
    """The experiment's output directory, created if missing.

    Precedence: an explicit path (a script's --out) over GPUPACK_OUT over ./out. Under
    gpupack both name the same directory; by hand, --out or ./out.
    """
    chosen = explicit or os.environ.get("GPUPACK_OUT") or Path.cwd() / "out"
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resuming() -> bool:
    """True when gpupack says an earlier attempt of this experiment was interrupted."""
    return os.environ.get("GPUPACK_RESUME") == "1"


def attempt() -> int:
    """This attempt's number (1 by hand, where GPUPACK_ATTEMPT is unset)."""
    raw = os.environ.get("GPUPACK_ATTEMPT", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"GPUPACK_ATTEMPT: expected an integer, got {raw!r}") from None


def preempt_signals() -> tuple[signal.Signals, ...]:
    """The preempt signal (GPUPACK_PREEMPT_SIGNAL, e.g. USR2, SIGUSR2 or 12) and SIGTERM."""
    sig = _preempt_signal_of(os.environ)  # the one the engine sends (gpupack.signals)
    return (sig,) if sig == signal.SIGTERM else (sig, signal.SIGTERM)


def on_preempt(fn: Callable[[], object]) -> None:
    """Call fn() once when the preempt signal or SIGTERM arrives.

    fn runs in the main thread between two bytecodes, wherever the program is, so it should
    be short: set a flag that the training loop checks at a step boundary, where the state
    is consistent enough to checkpoint. Later signals are ignored, so a scheduler that
    signals again during the grace period does not re-enter fn. Must be called from the
    main thread (a limit of Python's signal module).
    """
    global _received
    _received = None

    def handler(signum: int, _frame: object) -> None:
        global _received
        if _received is not None:
            return
        _received = signal.Signals(signum)
        fn()

    for sig in preempt_signals():
        signal.signal(sig, handler)


def preempt_signal() -> signal.Signals | None:
    """The signal that triggered the on_preempt callback, or None if none arrived yet.

    Exiting with 128 + its number after the checkpoint reports the attempt the way a shell
    reports a signal death: neither a success nor an ordinary crash.
    """
    return _received


def write_results(results: Mapping[str, Any], path: str | Path | None = None) -> Path:
    """Write results as JSON atomically (default: out_dir()/results.json); return the path.

    Non-finite floats (a diverged loss) are written as null: NaN is not JSON, and a run
    should not crash at its very end over one metric.
    """
    target = Path(path) if path is not None else out_dir() / "results.json"
    text = json.dumps(_finite(results), indent=2, allow_nan=False) + "\n"
    with atomic_path(target) as tmp:
        tmp.write_text(text)
    return target


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save(state) atomically: a kill mid-save leaves the previous checkpoint intact."""
    import torch

    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(dict(state), tmp)
    return target


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any] | None:
    """The checkpoint at path, or None when there is none yet.

    weights_only: tensors and plain containers only, so loading runs no pickled code.
    """
    import torch

    target = Path(path)
    if not target.exists():
        return None
    state: dict[str, Any] = torch.load(target, map_location=map_location, weights_only=True)
    return state
