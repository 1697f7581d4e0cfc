"""The manifest: YAML -> validated, expanded Experiment specs (DESIGN.md "Manifest").

Contract for the rest of gpupack: `load(path) -> Manifest` or `ManifestError` listing every
problem at once, each line "<file>: <experiment>: <field>: <what is wrong>", for example

    exp.yaml: bridge-{task}-s{seed}: mem: bad size '60 GX' (use MB, MiB, GB or GiB)
    exp.yaml: probe-s42: depends_on: 'train-s42' matches no experiment (did you mean 'train-s42-a'?)
    exp.yaml: phase seeds: barrier: expected true or false, got 'no'
    exp.yaml: manifest: line 7, column 3: mapping values are not allowed here

Problems of a whole template are named by the template (once, not once per expansion);
problems of one expansion (its name, its dependencies) by the expanded name. `load` raises
nothing but ManifestError, whatever the file holds: it is fed by fuzzing.

Rules beyond the design's text, each preventing a failure seen later at run time:
- duplicate YAML keys are refused (PyYAML keeps the last one silently);
- names must work as a directory name: no '/', NUL or control character, not '.' or '..',
  at most 200 characters and 255 UTF-8 bytes (the filesystem's limit);
- a `mem` given as a bare number under 1 MB is refused: `mem: 20` is 20 bytes, never meant;
- env may not set CUDA_VISIBLE_DEVICES or GPUPACK_*: gpupack sets them per attempt;
- a dependency on a later phase that sits behind a barrier would wait forever: refused;
- `nodes: K` (K > 1) takes whole nodes: its `gpus` counts per node, and only a `gpus` written in
  the experiment itself applies (a default is for one-node experiments); left out, it is the
  node's GPU count (`node_gpus` of `load`) where the caller knows it;
- grid values and env values are scalars (placeholder rules: templates.py).
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .templates import (
    BUILTIN_PLACEHOLDERS,
    NAME_PLACEHOLDERS,
    Template,
    compile_template,
    is_placeholder_name,
    nearest,
    render_scalar,
    text_problem,
)
from .signals import PREEMPT_SIGNAL_VAR, parse_signal
from .units import parse_duration as parse_duration  # re-exported: callers use manifest.parse_duration
from .units import parse_size as parse_size  # re-exported: callers use manifest.parse_size
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


@dataclass(frozen=True)
class Phase:
    name: str
    index: int
    barrier: bool


@dataclass(frozen=True)
class Experiment:
    name: str  # expanded, unique
    template: str  # the unexpanded name: grid siblings share it (learning estimates)
    phase: str
    phase_index: int
    barrier: bool
    order: int  # position after expansion
    cmd: str  # placeholders substituted; run with bash -c in workdir
    workdir: Path  # absolute
    out_dir: Path  # absolute: <run_dir>/exp/<name>
    gpus: int
    mem_bytes: int | None
    time_s: float | None
    cpus: int
    exclusive: bool
    resumable: bool
    retries: int
    util: float
    depends_on: tuple[str, ...]  # exact names after glob expansion
    outputs: tuple[str, ...]  # placeholders substituted; relative paths are relative to workdir
    env: Mapping[str, str]  # manifest-level env merged with the experiment's
    params: Mapping[str, object] = field(default_factory=dict)  # grid values of this expansion
    fingerprint: str = ""  # sha256 of cmd, env and workdir
    nodes: int = 1  # >1: spans that many whole nodes, `gpus` on each


@dataclass(frozen=True)
class Manifest:
    path: Path  # absolute
    name: str
    run_dir: Path  # absolute: <runs_dir>/<name>
    workdir: Path
    phases: tuple[Phase, ...]
    experiments: tuple[Experiment, ...]
    text: str  # the YAML as read (copied into the run directory)


# --------------------------------------------------------------------------- messages


def _label(name: str) -> str:
    """A name as it appears in a message: as written when printable, else escaped."""
    return name if name.isprintable() and name.strip() == name and name else _show(name)


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def _dirname_problem(name: str) -> str | None:
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


class _Problems:
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


def _integer(minimum: int) -> Callable[[object], int]:
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


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _mem(value: object) -> int | None:
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


def _time(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a duration like 2h, got {_show(value)}")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0 (leave it out when unknown)")
    return seconds


def _util(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"expected a number in (0, 1], got {_show(value)}")
    return float(value)


def _texts(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"expected a string or a list of non-empty strings, got {_show(value)}")
    return tuple(items)


def _is_scalar(value: object) -> bool:
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


def _env(value: object) -> dict[str, str]:
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
        elif not _is_scalar(item):
            bad.append((f".{key}", f"expected a string or number, got {_show(item)}"))
        else:
            env[key] = render_scalar(item)
    if bad:
        raise _Invalid(bad)
    return env


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "gpus": _integer(0), "nodes": _integer(1), "mem": _mem, "time": _time, "cpus": _integer(1),
    "exclusive": _boolean, "resumable": _boolean, "retries": _integer(0), "util": _util,
    "depends_on": _texts, "outputs": _texts, "env": _env,
}  # fmt: skip
_BUILTIN_VALUES: dict[str, Any] = {
    "gpus": 1, "nodes": 1, "mem": None, "time": None, "cpus": 1, "exclusive": False, "resumable": False,
    "retries": 0, "util": 1.0, "depends_on": (), "outputs": (), "env": {},
}  # fmt: skip
_TOP_KEYS = ["name", "runs_dir", "workdir", "env", "defaults", "phases"]
_PHASE_KEYS = ["name", "barrier", "experiments"]
_EXPERIMENT_KEYS = ["name", "cmd", "grid", *_FIELDS]
_TEMPLATED = ("depends_on", "outputs")  # besides name, cmd and env values


# --------------------------------------------------------------------------- YAML


class _NoDuplicateKeys(yaml.constructor.SafeConstructor):
    """SafeConstructor refusing duplicate keys: PyYAML keeps the last `mem:` silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key_node.value)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


class _Loader(yaml.SafeLoader, _NoDuplicateKeys):
    """The pure-Python loader: its messages (and line marks) are the ones users see."""


# Where libyaml accepts what the pure-Python loader refuses (or reads differently): tabs inside
# plain scalars, a lone `!` tag, a comment glued to a block scalar header, byte order marks and
# the non-ASCII line breaks. Such text takes the pure-Python path, so no manifest's meaning or
# refusal depends on whether libyaml is installed (found by differential fuzzing of the two).
_LIBYAML_DIFFERS = re.compile("\t|!|[|>][-+0-9]*#|[\ufeff\x85\u2028\u2029]")
_FastLoader: type | None = None
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(yaml.CSafeLoader, _NoDuplicateKeys):
        """libyaml's parser: a 10,000-experiment grid loads in a fraction of the time."""

    _FastLoader = _CLoader


def _read_yaml(text: str, problems: _Problems) -> object:
    if _FastLoader is not None and not _LIBYAML_DIFFERS.search(text):
        try:
            return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a SafeLoader equivalent
        except Exception:  # noqa: S110 - the pure-Python loader below says what is wrong
            pass  # libyaml words its errors differently: report them as the Python loader does
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "yaml"
        problems.add("manifest", where, " ".join(str(e.problem or e.context or "invalid YAML").split()))
    except RecursionError:
        problems.add("manifest", "yaml", "nested too deeply")
    except Exception as e:  # ReaderError (bad characters), int() of a 5000-digit number...
        problems.add("manifest", "yaml", " ".join(f"{e}".split()) or type(e).__name__)
    return None


# --------------------------------------------------------------------------- building


@dataclass
class _Spec:
    """One experiment entry, checked, not yet expanded."""

    who: str  # how messages name it: the template, or its position when that is unusable
    template: str
    phase: Phase
    name: Template | None
    cmd: Template | None
    grid: list[tuple[str, list[Any]]]
    values: dict[str, Any]  # every field of _FIELDS, merged with defaults and built-ins
    depends_on: tuple[Template, ...]
    outputs: tuple[Template, ...]
    env: dict[str, Template]

    @property
    def count(self) -> int:
        return math.prod(len(values) for _, values in self.grid)


_MISSING = object()


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or text_problem(value):
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return value


def _run_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string (the run directory's name), got {_show(value)}")
    why = _dirname_problem(value)
    if why:
        raise ValueError(why)
    return value


def _items(what: str) -> Callable[[object], list[Any]]:
    def parse(value: object) -> list[Any]:
        if not isinstance(value, list) or not value:
            raise ValueError(f"expected a non-empty list of {what}, got {_show(value)}")
        return value

    return parse


class _Builder:
    def __init__(self, path: Path, shown: str, text: str, gpu_capacity_bytes: int | None, node_gpus: int | None = None):
        self.path, self.text, self.capacity, self.node_gpus = path, text, gpu_capacity_bytes, node_gpus
        self.problems = _Problems(shown)

    def _report(self, who: str, where: str, error: ValueError) -> None:
        for sub, what in getattr(error, "items", [("", str(error))]):
            self.problems.add(who, where + sub, what)

    def _field(self, who: str, where: str, parse: Callable[[Any], Any], value: object) -> Any:
        """parse(value), or None after reporting why not."""
        try:
            return parse(value)
        except ValueError as e:
            self._report(who, where, e)
            return None

    def _get(self, who: str, raw: Mapping[Any, Any], key: str, parse: Callable[[Any], Any],
             default: object = _MISSING) -> Any:
        if key not in raw and default is _MISSING:
            self.problems.add(who, key, "missing (required)")
            return None
        return self._field(who, key, parse, raw.get(key, default))

    def _keys(self, who: str, mapping: Mapping[Any, Any], valid: list[str], where: str = "") -> None:
        for key in mapping:
            if key not in valid:
                self.problems.add(who, where + (_label(key) if isinstance(key, str) else _show(key)),
                                  f"unknown key{nearest(key, valid)}")

    def _fields(self, who: str, raw: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
        """The experiment fields present in `raw`, parsed; bad ones are reported and left out."""
        parsed = {}
        for key, parse in _FIELDS.items():
            if key in raw:
                try:
                    parsed[key] = parse(raw[key])
                except ValueError as e:
                    self._report(who, prefix + key, e)
        return parsed

    def _templates(self, who: str, where: str, texts: Any, allowed: tuple[str, ...]) -> Any:
        """Compile one text, a tuple of texts or an env mapping; bad ones are reported, dropped."""
        if isinstance(texts, dict):
            out = {k: self._templates(who, f"{where}.{k}", v, allowed) for k, v in texts.items()}
            return {k: t for k, t in out.items() if t is not None}
        if isinstance(texts, tuple):
            compiled = (self._templates(who, where, t, allowed) for t in texts)
            return tuple(t for t in compiled if t is not None)
        return self._field(who, where, lambda t: compile_template(t, allowed), texts)

    def build(self) -> Manifest:
        data = _read_yaml(self.text, self.problems)
        if self.problems.lines:
            raise self.problems.error()
        if not isinstance(data, dict):
            got = "an empty file" if data is None else _show(data)
            self.problems.add("manifest", "top level", f"expected a mapping (name:, phases:, ...), got {got}")
            raise self.problems.error()
        top = "manifest"
        self._keys(top, data, _TOP_KEYS)
        name = self._get(top, data, "name", _run_name)
        base = self.path.parent
        runs_dir = self._get(top, data, "runs_dir", _text, "runs")
        run_dir = Path(os.path.abspath(base / os.path.expanduser(runs_dir or "runs"))) / (name or "_")
        workdir_text = self._get(top, data, "workdir", _text, ".")
        workdir = Path(os.path.abspath(base / os.path.expanduser(workdir_text or ".")))
        if workdir_text is not None and not workdir.is_dir():
            self.problems.add(top, "workdir", f"no such directory: {workdir}")
        env = self._templates(top, "env", self._get(top, data, "env", _env, {}) or {}, BUILTIN_PLACEHOLDERS)
        merged = self._defaults(data.get("defaults", {}), env)
        phases: list[Phase] = []
        specs: list[_Spec] = []
        for i, raw in enumerate(self._get(top, data, "phases", _items("phases")) or []):
            self._phase(i, raw, merged, phases, specs)
        total = sum(spec.count for spec in specs)
        if total > MAX_EXPERIMENTS:
            largest = max(specs, key=lambda s: s.count)
            self.problems.add(top, "grid", f"expands to {total:,} experiments, more than the limit of "
                              f"{MAX_EXPERIMENTS:,} (largest: {largest.who} x {largest.count:,})")
            raise self.problems.error()
        experiments = _Expansion(self.problems, run_dir, workdir, phases).run(specs)
        if self.problems.lines:
            raise self.problems.error()
        return Manifest(self.path, name, run_dir, workdir, tuple(phases), experiments, self.text)

    def _defaults(self, defaults: object, env: dict[str, Template]) -> dict[str, Any]:
        """Built-in values overridden by `defaults:`; its placeholders may only be built-ins."""
        if not isinstance(defaults, Mapping):
            self.problems.add("manifest", "defaults", f"expected a mapping of experiment fields, got {_show(defaults)}")
            defaults = {}
        per_experiment = ("name", "cmd", "grid")
        for key in per_experiment:
            if key in defaults:
                self.problems.add("manifest", f"defaults.{key}", "can't have a default: set it in each experiment")
        self._keys("manifest", {k: v for k, v in defaults.items() if k not in per_experiment},
                   list(_FIELDS), "defaults.")
        merged = {**_BUILTIN_VALUES, **self._fields("manifest", defaults, "defaults.")}
        for key in (*_TEMPLATED, "env"):
            merged[key] = self._templates("manifest", f"defaults.{key}", merged[key], BUILTIN_PLACEHOLDERS)
        merged["env"] = {**env, **merged["env"]}
        return merged

    def _phase(self, i: int, raw: object, merged: dict[str, Any], phases: list[Phase], specs: list[_Spec]) -> None:
        who = f"phase #{i + 1}"
        if not isinstance(raw, Mapping):
            self.problems.add(who, "phases", f"expected a mapping (name:, experiments:), got {_show(raw)}")
            return
        name = self._get(who, raw, "name", _text)
        if name is not None:
            who = f"phase {_label(name)}"
            if any(p.name == name for p in phases):
                self.problems.add(who, "name", "duplicate phase name")
        self._keys(who, raw, _PHASE_KEYS)
        barrier = self._get(who, raw, "barrier", _boolean, False)
        phase = Phase(name or f"#{i + 1}", len(phases), bool(barrier))
        phases.append(phase)
        for j, exp in enumerate(self._get(who, raw, "experiments", _items("experiments")) or []):
            spec = self._experiment(phase, f"{who} experiment #{j + 1}", exp, merged)
            if spec is not None:
                specs.append(spec)

    def _experiment(self, phase: Phase, who: str, raw: object, merged: dict[str, Any]) -> _Spec | None:
        if not isinstance(raw, Mapping):
            self.problems.add(who, "experiment", f"expected a mapping (name:, cmd:, ...), got {_show(raw)}")
            return None
        template = self._get(who, raw, "name", _text)
        who = _label(template) if template is not None else who
        self._keys(who, raw, _EXPERIMENT_KEYS)
        grid = self._grid(who, raw.get("grid", {}))
        keys = tuple(k for k, _ in grid)
        allowed = (*keys, *BUILTIN_PLACEHOLDERS)
        name = None
        if template is not None:
            name = self._field(who, "name", lambda t: compile_template(t, (*keys, *NAME_PLACEHOLDERS), True), template)
        cmd = self._get(who, raw, "cmd", lambda t: compile_template(_text(t), allowed))
        own = self._fields(who, raw)
        for key in (*_TEMPLATED, "env"):
            if key in own:
                own[key] = self._templates(who, key, own[key], allowed)
        values = {**merged, **own}
        if values["nodes"] > 1 and "gpus" not in own and self.node_gpus is not None:
            values["gpus"] = self.node_gpus  # whole nodes
        if values["nodes"] > 1 and not values["gpus"]:
            self.problems.add(who, "gpus", f"nodes: {values['nodes']} takes whole nodes: leave gpus out or give a node's GPU count")
        mem = values["mem"]
        if self.capacity is not None and values["gpus"] and mem is not None and mem > self.capacity:
            self.problems.add(who, "mem", f"{mem / 1e9:.1f} GB is more than a GPU holds "
                              f"({self.capacity / 1e9:.1f} GB): can't fit on any GPU")
        env = {**merged["env"], **own.get("env", {})}
        return _Spec(who, template or who, phase, name, cmd, grid, values,
                     values.pop("depends_on"), values.pop("outputs"), env)

    def _grid(self, who: str, raw: object) -> list[tuple[str, list[Any]]]:
        if not isinstance(raw, Mapping):
            self.problems.add(who, "grid", f"expected a mapping key: [values], got {_show(raw)}")
            return []
        grid = []
        for key, values in raw.items():
            if not isinstance(key, str) or not is_placeholder_name(key):
                self.problems.add(who, "grid", f"key {_show(key)} is not a placeholder name (letters, digits, _ and -)")
            elif key in BUILTIN_PLACEHOLDERS:
                self.problems.add(who, f"grid.{key}", f"{{{key}}} is a built-in placeholder; rename the key")
            elif not isinstance(values, list) or not values:
                hint = f" (write [{_show(values)}])" if _is_scalar(values) else ""
                self.problems.add(who, f"grid.{key}", f"expected a non-empty list of values, got {_show(values)}{hint}")
            elif bad := [v for v in values if not _is_scalar(v)]:
                what = f"values must be strings or numbers, got {_show(bad[0])} (quote it)"
                self.problems.add(who, f"grid.{key}", what)
            else:
                grid.append((key, values))
        return grid


class _Expansion:
    """Grid expansion, placeholder substitution, dependency resolution and graph checks."""

    def __init__(self, problems: _Problems, run_dir: Path, workdir: Path, phases: list[Phase]):
        self.problems, self.run_dir, self.workdir, self.phases = problems, run_dir, workdir, phases
        self.globs: dict[str, list[str]] = {}
        self.sorted_names: list[str] = []
        self.order: dict[str, int] = {}

    def run(self, specs: list[_Spec]) -> tuple[Experiment, ...]:
        records: dict[str, tuple[_Spec, dict[str, Any], list[str]]] = {}
        all_named = True
        for spec in specs:
            if spec.name is None:
                all_named = False
                continue
            for combo in itertools.product(*(values for _, values in spec.grid)):
                self._one(spec, dict(zip((k for k, _ in spec.grid), combo)), records)
        if not all_named:
            return ()  # dependency checks against a partial list of names would mislead
        self.sorted_names, self.order = sorted(records), {n: i for i, n in enumerate(records)}
        graph = {name: self._resolve(name, spec, patterns, records) for name, (spec, _, patterns) in records.items()}
        for cycle in _cycles(graph):
            shown = list(map(_label, cycle))
            if len(shown) > 12:  # one line, even for a cycle through thousands
                shown = [*shown[:5], f"... ({len(shown) - 10} more)", *shown[-5:]]
            self.problems.add(shown[0], "depends_on", "dependency cycle: " + " -> ".join(shown))
        return tuple(
            Experiment(depends_on=graph[name], order=i, **built)
            for i, (name, (_, built, _)) in enumerate(records.items())
        )

    def _one(self, spec: _Spec, params: dict[str, Any], records: dict[str, Any]) -> None:
        values: dict[str, Any] = {**params, "phase": spec.phase.name, "gpus": spec.values["gpus"], "nodes": spec.values["nodes"]}
        texts = {k: render_scalar(v) for k, v in values.items()}

        def render(where: str, template: Template) -> str:
            try:
                return template.render(values, texts)
            except (ValueError, TypeError) as e:  # a format spec that doesn't suit this value
                self.problems.add(spec.who, where, f"can't format: {e}")
                return ""

        name = render("name", spec.name) if spec.name else ""
        why = _dirname_problem(name)
        if why:
            self.problems.add(spec.who, "name", why)
            return
        if name in records:
            other = records[name][0]
            self.problems.add(spec.who, "name", f"duplicate experiment name {_show(name)} after expansion "
                              f"(also from {other.who}, phase {_label(other.phase.name)}); "
                              "put every grid key that varies into the name")
            return
        out = f"{self.run_dir}/exp/{name}"
        values.update(name=name, out=out, run=str(self.run_dir))
        texts.update(name=name, out=out, run=str(self.run_dir))
        cmd = render("cmd", spec.cmd) if spec.cmd else ""
        env = {k: render(f"env.{k}", t) for k, t in sorted(spec.env.items())}
        canonical = json.dumps([cmd, sorted(env.items()), str(self.workdir)], separators=(",", ":"))
        v = spec.values
        built = dict(
            name=name, template=spec.template, phase=spec.phase.name, phase_index=spec.phase.index,
            barrier=spec.phase.barrier, cmd=cmd, workdir=self.workdir, out_dir=Path(out),
            gpus=v["gpus"], mem_bytes=v["mem"], time_s=v["time"], cpus=v["cpus"],
            exclusive=v["exclusive"], resumable=v["resumable"], retries=v["retries"], util=v["util"], nodes=v["nodes"],
            outputs=tuple(render("outputs", t) for t in spec.outputs),
            env=env, params=params, fingerprint=hashlib.sha256(canonical.encode()).hexdigest(),
        )  # fmt: skip
        patterns = [render("depends_on", t) for t in spec.depends_on]
        records[name] = (spec, built, patterns)

    def _resolve(self, name: str, spec: _Spec, patterns: list[str], records: dict[str, Any]) -> tuple[str, ...]:
        deps: dict[str, None] = {}
        for pattern in patterns:
            if pattern == name:
                self.problems.add(_label(name), "depends_on", "depends on itself")
            elif pattern in records:  # exact, even when the name holds glob characters
                deps[pattern] = None
            elif any(c in pattern for c in "*?["):
                matched = [n for n in self._glob(pattern) if n != name]
                if not matched:
                    self.problems.add(_label(name), "depends_on", f"{_show(pattern)} matches no other experiment")
                deps.update(dict.fromkeys(matched))
            else:
                # Past the shown lines, a suggestion is never read; each one scans every name.
                shown = len(self.problems.lines) < MAX_PROBLEMS_SHOWN
                hint = nearest(pattern, list(records), list_all=False) if shown else ""
                self.problems.add(_label(name), "depends_on", f"{_show(pattern)} matches no experiment{hint}")
        for dep in deps:
            later = records[dep][0].phase
            between = self.phases[spec.phase.index + 1 : later.index + 1]  # empty unless `later` is later
            if any(p.barrier for p in between):
                self.problems.add(_label(name), "depends_on", f"{_show(dep)} is in phase {_label(later.name)}, "
                                  f"which waits at a barrier for phase {_label(spec.phase.name)} to end: deadlock")
        return tuple(deps)

    def _glob(self, pattern: str) -> list[str]:
        """Names matching `pattern`, in manifest order. Only names sharing its literal prefix are
        tried: a grid substitutes a distinct pattern per expansion ("train-{seed}-*"), and a scan
        of all names for each would be quadratic in 100,000 expansions."""
        if pattern not in self.globs:
            match = re.compile(fnmatch.translate(pattern)).match  # case-sensitive, unlike fnmatch.filter
            prefix = re.split(r"[*?[]", pattern, maxsplit=1)[0]
            names, found = self.sorted_names, []
            i = bisect.bisect_left(names, prefix)
            while i < len(names) and names[i].startswith(prefix):
                if match(names[i]):
                    found.append(names[i])
                i += 1
            self.globs[pattern] = sorted(found, key=self.order.__getitem__)
        return self.globs[pattern]


def _cycles(graph: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """One cycle per back edge, found by an iterative DFS (100,000 nodes would overflow recursion)."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    cycles = []
    for root in graph:
        if state[root]:
            continue
        path, position, stack = [root], {root: 0}, [iter(graph[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                state[path[-1]] = 2
                del position[path.pop()]
            elif state[nxt] == 1:
                cycles.append(path[position[nxt]:] + [nxt])
            elif state[nxt] == 0:
                state[nxt] = 1
                position[nxt] = len(path)
                path.append(nxt)
                stack.append(iter(graph[nxt]))
    return cycles


# --------------------------------------------------------------------------- entry points


def load_text(
    text: str, path: str | Path, gpu_capacity_bytes: int | None = None, node_gpus: int | None = None
) -> Manifest:
    """Like `load`, for YAML already read; `path` names the file and anchors relative paths."""
    shown = str(path)
    try:
        return _Builder(Path(os.path.abspath(path)), shown, text, gpu_capacity_bytes, node_gpus).build()
    except ManifestError:
        raise
    except RecursionError:
        raise ManifestError([f"{shown}: manifest: yaml: nested too deeply"]) from None
    except Exception as e:  # the contract: no YAML content ends in a traceback
        what = f"{type(e).__name__}: {e} (a gpupack bug; please report it)"
        raise ManifestError([f"{shown}: manifest: internal: {what}"]) from e


def load(path: str | Path, gpu_capacity_bytes: int | None = None, node_gpus: int | None = None) -> Manifest:
    """Read, validate and expand a manifest. With gpu_capacity_bytes, a mem above it is refused;
    node_gpus (the GPUs of a node) is what `gpus` is for a `nodes: K` experiment that leaves it out."""
    shown = str(path)
    try:
        raw = Path(path).read_bytes()
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise ManifestError([f"{shown}: manifest: file: can't read: {getattr(e, 'strerror', None) or e}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError([f"{shown}: manifest: file: not UTF-8 text (bad byte at offset {e.start})"]) from None
    return load_text(text, path, gpu_capacity_bytes, node_gpus)
