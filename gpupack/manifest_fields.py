"""Manifest fields: the one-line problem messages and the parsers of single values.

Owns ManifestError and how a problem reads ("<file>: <experiment>: <field>: <what is wrong>",
at most MAX_PROBLEMS_SHOWN lines), the checks of names (a name is a directory name), and one
parser per experiment field (`FIELDS`: gpus, mem, time, env, ...), each raising ValueError with the
message shown after the field's name. Pure: no files, no YAML (manifest_yaml.py), no structure
(manifest.py) and no expansion (manifest_expansion.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .signals import PREEMPT_SIGNAL_VAR, parse_signal
from .templates import render_scalar, text_problem
from .units import parse_duration, parse_size
from .units import show_value as _show

MAX_EXPERIMENTS = 100_000  # after grid expansion, in the whole manifest
MAX_PROBLEMS_SHOWN = 100
MAX_NAME_CHARS = 200
_MAX_INT = 2**31 - 1


class ManifestError(Exception):
    """Every problem found in a manifest; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- messages


def label(name: str) -> str:
    """A name as it appears in a message: as written when printable, else escaped."""
    return name if name.isprintable() and name.strip() == name and name else _show(name)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def dirname_problem(name: str) -> str | None:
    why = text_problem(name)
    if why:
        return why
    if name in ("", ".", ".."):
        return f"{_show(name)} can't be a directory name"
    if "/" in name:
        return f"{_show(name)} contains '/' (a name is a directory name)"
    if _CONTROL_RE.search(name):
        return f"{_show(name)} contains a control character"
    if len(name) > MAX_NAME_CHARS or len(name.encode()) > 255:
        return f"{_show(name)} is longer than {MAX_NAME_CHARS} characters or 255 UTF-8 bytes"
    return None


class Problems:
    def __init__(self, shown_path: str):
        self.path = shown_path
        self.lines: dict[str, None] = {}  # ordered set: one grid template repeats the same line

    def add(self, who: str, where: str, what: str) -> None:
        line = f"{self.path}: {who}: {where}: {what}"
        self.lines[line.replace("\r", " ").replace("\n", " ")] = None

    def error(self) -> ManifestError:
        lines = list(self.lines)
        if len(lines) > MAX_PROBLEMS_SHOWN:
            rest = len(lines) - MAX_PROBLEMS_SHOWN
            lines = lines[:MAX_PROBLEMS_SHOWN] + [f"{self.path}: manifest: problems: {rest} more not shown"]
        return ManifestError(lines)


# --------------------------------------------------------------------------- fields


def integer(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        # YAML's true is an int to Python; `gpus: true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer >= {minimum}, got {_show(value)}")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {_show(value)}")
        if value > _MAX_INT:  # SQLite and JSON readers overflow long before any real use
            raise ValueError(f"too large: {_show(value)}")
        return value

    return parse


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def mem_field(value: object) -> int | None:
    if value is None:
        return None  # explicit null: unknown, overriding a default
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a size like 20GB, got {_show(value)}")
    size = parse_size(value)
    unitless = not isinstance(value, str) or not re.search(r"[A-Za-z]", value)
    if unitless and size < 10**6:
        raise ValueError(f"{_show(value)} means {size} bytes; write a unit, e.g. 20GB or 20GiB")
    if size == 0:
        raise ValueError("must be more than 0 (leave it out when unknown)")
    return size


def time_field(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration like 2h, got {_show(value)}")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 (leave it out when unknown)")
    return seconds


def util_field(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], got {_show(value)}")
    return float(value)


def texts_field(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"expected a string or a list of non-empty strings, got {_show(value)}")
    return tuple(items)


def is_scalar(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() <= 64
    return isinstance(value, (str, bool, float)) and not (isinstance(value, str) and text_problem(value))


# GPUPACK_PREEMPT_SIGNAL is the user's to set: it chooses the signal gpupack sends (README).
_RESERVED_ENV = re.compile(r"CUDA_VISIBLE_DEVICES|GPUPACK_(?!PREEMPT_SIGNAL$).*")


class _Invalid(ValueError):
    """Several problems of one field, each under its own sub-field (".KEY")."""

    def __init__(self, items: list[tuple[str, str]]):
        super().__init__("; ".join(what for _, what in items))
        self.items = items


def _signal_problem(value: object) -> str | None:
    try:
        parse_signal(str(value))
    except ValueError as exc:
        return str(exc).split(": ", 1)[1]  # the field is named by the caller
    return None


def env_field(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping NAME: value, got {_show(value)}")
    env, bad = {}, []
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or text_problem(key):
            bad.append(("", f"bad variable name {_show(key)}"))
        elif _RESERVED_ENV.fullmatch(key):
            bad.append((f".{key}", "set by gpupack for each attempt; leave it out"))
        elif key == PREEMPT_SIGNAL_VAR and (why := _signal_problem(item)):
            bad.append((f".{key}", why))
        elif isinstance(item, str) and (why := text_problem(item)):
            bad.append((f".{key}", f"value {why}"))
        elif not is_scalar(item):
            bad.append((f".{key}", f"expected a string or number, got {_show(item)}"))
        else:
            env[key] = render_scalar(item)
    if bad:
        raise _Invalid(bad)
    return env


FIELDS: dict[str, Callable[[Any], Any]] = {
    "gpus": integer(0), "nodes": integer(1), "mem": mem_field, "time": time_field, "cpus": integer(1),
    "exclusive": boolean, "resumable": boolean, "retries": integer(0), "util": util_field,
    "depends_on": texts_field, "outputs": texts_field, "env": env_field,
}  # fmt: skip
BUILTIN_VALUES: dict[str, Any] = {
    "gpus": 1, "nodes": 1, "mem": None, "time": None, "cpus": 1, "exclusive": False, "resumable": False,
    "retries": 0, "util": 1.0, "depends_on": (), "outputs": (), "env": {},
}  # fmt: skip
TOP_KEYS = ["name", "runs_dir", "workdir", "env", "defaults", "phases"]
PHASE_KEYS = ["name", "barrier", "experiments"]
EXPERIMENT_KEYS = ["name", "cmd", "grid", *FIELDS]
TEMPLATED = ("depends_on", "outputs")  # besides name, cmd and env values


def nonempty_text(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or text_problem(value):
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return value


def run_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string (the run directory's name), got {_show(value)}")
    why = dirname_problem(value)
    if why:
        raise ValueError(why)
    return value


def nonempty_list(what: str) -> Callable[[object], list[Any]]:
    def parse(value: object) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of {what}, got {_show(value)}")
        return value

    return parse
