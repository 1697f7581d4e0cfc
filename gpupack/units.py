"""Human-readable sizes and durations for messages, tables and reports (parsing lives in manifest)."""

from __future__ import annotations


def format_bytes(n: int | float | None) -> str:
    """GB = 10^9 bytes, as the manifest counts them."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float | None) -> str:
    """90 -> '1m30s', 7260 -> '2h01m', 93600 -> '1d2h'."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"
