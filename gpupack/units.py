"""Sizes and durations: parsed from manifests and options ("20GB", "1h30m", Slurm's "1-02:00:00"),
and printed for messages, tables and reports. GB = 10^9 bytes, GiB = 2^30."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal


def format_bytes(n: int | float | None) -> str:
    """GB = 10^9 bytes, as the manifest counts them."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_duration(seconds: float | None) -> str:
    """90 -> '1m30s', 7260 -> '2h01m', 93600 -> '1d02h': two units, the second zero-padded."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20,
    "gb": 10**9, "gib": 2**30, "tb": 10**12, "tib": 2**40,
}  # fmt: skip
# re.ASCII: "٣GB" matches \d otherwise, and Decimal would read it as 3.
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)", re.ASCII)
_SIZE_HINT = "use MB, MiB, GB or GiB"
_MAX_BYTES = 2**63 - 1  # what SQLite and NVML arithmetic hold


def _number_value(value: object, what: str) -> int | float:
    """An int or float from YAML; bools (YAML's true is an int to Python) are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {what}, got {show_value(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected {what}, got {show_value(value)}")
    if value < 0:
        raise ValueError(f"must not be negative, got {show_value(value)}")
    return value


def parse_size(text: str | int | float) -> int:
    """"20GB" -> 20_000_000_000 (GB = 10^9, GiB = 2^30); an int is bytes. ValueError says why."""
    if not isinstance(text, str):
        value = _number_value(text, "a size like 20GB")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"bad size {show_value(text)} (a number is bytes; {_SIZE_HINT})")
        number, unit = Decimal(int(value)), ""
    else:
        match = _SIZE_RE.fullmatch(text.strip())
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            negative = text.strip().startswith("-")
            raise ValueError(f"{'negative' if negative else 'bad'} size {show_value(text)} ({_SIZE_HINT})")
        number, unit = Decimal(match.group(1)), match.group(2).lower()
    size = math.ceil(number * _SIZE_UNITS[unit])  # "0.5 KB" is 500 bytes, never rounded down to 0
    if size > _MAX_BYTES:
        raise ValueError(f"too large: {show_value(text)} is more than 2^63 bytes")
    return size


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_NUMBER = r"(\d{1,15}(?:\.\d{0,15})?|\.\d{1,15})"
_NUMBER_RE = re.compile(_NUMBER, re.ASCII)
_DURATION_RE = re.compile(rf"(?:{_NUMBER}\s*[dhms]\s*)+", re.IGNORECASE | re.ASCII)
_DURATION_PART = re.compile(rf"{_NUMBER}\s*([dhms])", re.IGNORECASE | re.ASCII)
_CLOCK_RE = re.compile(r"(?:(\d{1,5})-)?(\d{1,6}):([0-5]\d):([0-5]\d)|(\d{1,6}):([0-5]\d)", re.ASCII)  # Slurm's
_DURATION_HINT = "use 90s, 15m, 2h, 1d, 1h30m, seconds or [D-]HH:MM:SS"


def parse_duration(text: str | int | float) -> float:
    """Seconds from "90s" "15m" "2h" "1d" "1h30m", Slurm's "[D-]HH:MM:SS" / "MM:SS", or a number."""
    if not isinstance(text, str):
        value = _number_value(text, "a duration like 2h")
        if value > 1e12:  # float() of a 400-digit int overflows; no estimate is 30,000 years
            raise ValueError(f"too long: {show_value(text)} seconds is more than 30,000 years")
        return float(value)
    s = text.strip()
    if _NUMBER_RE.fullmatch(s):
        return float(s)
    if clock := _CLOCK_RE.fullmatch(s):
        days, hours, minutes, secs, mm, ss = (int(g) if g else 0 for g in clock.groups())
        return float(days * 86400 + hours * 3600 + (minutes + mm) * 60 + secs + ss)
    if _DURATION_RE.fullmatch(s):
        parts = [(float(n), u.lower()) for n, u in _DURATION_PART.findall(s)]
        units = [u for _, u in parts]
        # "30m1h" or "1h1h" is a typo, not a sum to guess at.
        if units == sorted(set(units), key="dhms".index):
            return sum(n * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(f"bad duration {show_value(text)} ({_DURATION_HINT})")


def show_value(value: object) -> str:
    """A short, single-line, printable rendering of a YAML value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return "a very large integer"  # str() of a huge int raises ValueError in 3.11
    if value is None or isinstance(value, (str, int, float)):
        text = repr(value)  # escapes newlines, NUL and lone surrogates
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, (Mapping, list)):
        kind = "mapping" if isinstance(value, Mapping) else "list"
        return f"an empty {kind}" if not value else f"a {kind}"
    return f"a {type(value).__name__}"  # never repr() a container: YAML aliases make it exponential
