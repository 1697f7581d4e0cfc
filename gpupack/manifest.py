"""The manifest: YAML -> validated, expanded Experiment specs (README "The manifest").

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

This module owns the `Experiment` and `Manifest` specs, the manifest's structure (top level,
phases, experiment entries, defaults) and `load`; the parts live beside it: manifest_fields.py
(messages and the parser of each field), manifest_yaml.py (YAML text -> data) and
manifest_expansion.py (grid, templates, dependencies, cycles).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest_expansion import Expansion, Spec
from .manifest_expansion import Phase as Phase  # re-exported: Manifest.phases holds them
from .manifest_fields import (
    BUILTIN_VALUES,
    EXPERIMENT_KEYS,
    FIELDS,
    MAX_EXPERIMENTS as MAX_EXPERIMENTS,  # re-exported: the limit users read about
    PHASE_KEYS,
    TEMPLATED,
    TOP_KEYS,
    ManifestError as ManifestError,  # re-exported: what load raises
    Problems,
    boolean,
    env_field,
    is_scalar,
    label,
    nonempty_list,
    nonempty_text,
    run_name,
)
from .manifest_yaml import read_yaml
from .templates import BUILTIN_PLACEHOLDERS, NAME_PLACEHOLDERS, Template, compile_template, is_placeholder_name, nearest
from .units import parse_duration as parse_duration  # re-exported: callers use manifest.parse_duration
from .units import parse_size as parse_size  # re-exported: callers use manifest.parse_size
from .units import show_value as _show

# Part of gpupack's Python API (README "Python API"): these names are kept stable.
__all__ = [
    "MAX_EXPERIMENTS", "Experiment", "Manifest", "ManifestError", "Phase", "load", "load_text",
    "parse_duration", "parse_size",
]


@dataclass(frozen=True)
class Experiment:
    """One expanded experiment, as `load` returns it: every field checked, placeholders
    substituted, dependencies resolved to exact names; sizes in bytes, times in seconds."""

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
    """A loaded manifest: its phases in order and its experiments in manifest order."""

    path: Path  # absolute
    name: str
    run_dir: Path  # absolute: <runs_dir>/<name>
    workdir: Path
    phases: tuple[Phase, ...]
    experiments: tuple[Experiment, ...]
    text: str  # the YAML as read (copied into the run directory)


_MISSING = object()


class _Builder:
    def __init__(self, path: Path, shown: str, text: str, gpu_capacity_bytes: int | None, node_gpus: int | None = None):
        self.path, self.text, self.capacity, self.node_gpus = path, text, gpu_capacity_bytes, node_gpus
        self.problems = Problems(shown)

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
                self.problems.add(who, where + (label(key) if isinstance(key, str) else _show(key)),
                                  f"unknown key{nearest(key, valid)}")

    def _fields(self, who: str, raw: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
        """The experiment fields present in `raw`, parsed; bad ones are reported and left out."""
        parsed = {}
        for key, parse in FIELDS.items():
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
        data = read_yaml(self.text, self.problems)
        if self.problems.lines:
            raise self.problems.error()
        if not isinstance(data, dict):
            got = "an empty file" if data is None else _show(data)
            self.problems.add("manifest", "top level", f"expected a mapping (name:, phases:, ...), got {got}")
            raise self.problems.error()
        top = "manifest"
        self._keys(top, data, TOP_KEYS)
        name = self._get(top, data, "name", run_name)
        base = self.path.parent
        runs_dir = self._get(top, data, "runs_dir", nonempty_text, "runs")
        run_dir = Path(os.path.abspath(base / os.path.expanduser(runs_dir or "runs"))) / (name or "_")
        workdir_text = self._get(top, data, "workdir", nonempty_text, ".")
        workdir = Path(os.path.abspath(base / os.path.expanduser(workdir_text or ".")))
        if workdir_text is not None and not workdir.is_dir():
            self.problems.add(top, "workdir", f"no such directory: {workdir}")
        env = self._templates(top, "env", self._get(top, data, "env", env_field, {}) or {}, BUILTIN_PLACEHOLDERS)
        merged = self._defaults(data.get("defaults", {}), env)
        phases: list[Phase] = []
        specs: list[Spec] = []
        for i, raw in enumerate(self._get(top, data, "phases", nonempty_list("phases")) or []):
            self._phase(i, raw, merged, phases, specs)
        total = sum(spec.count for spec in specs)
        if total > MAX_EXPERIMENTS:
            largest = max(specs, key=lambda s: s.count)
            self.problems.add(top, "grid", f"expands to {total:,} experiments, more than the limit of "
                              f"{MAX_EXPERIMENTS:,} (largest: {largest.who} x {largest.count:,})")
            raise self.problems.error()
        records = Expansion(self.problems, run_dir, workdir, phases).run(specs)
        experiments = tuple(Experiment(depends_on=deps, order=i, **built) for i, (built, deps) in enumerate(records))
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
                   list(FIELDS), "defaults.")
        merged = {**BUILTIN_VALUES, **self._fields("manifest", defaults, "defaults.")}
        for key in (*TEMPLATED, "env"):
            merged[key] = self._templates("manifest", f"defaults.{key}", merged[key], BUILTIN_PLACEHOLDERS)
        merged["env"] = {**env, **merged["env"]}
        return merged

    def _phase(self, i: int, raw: object, merged: dict[str, Any], phases: list[Phase], specs: list[Spec]) -> None:
        who = f"phase #{i + 1}"
        if not isinstance(raw, Mapping):
            self.problems.add(who, "phases", f"expected a mapping (name:, experiments:), got {_show(raw)}")
            return
        name = self._get(who, raw, "name", nonempty_text)
        if name is not None:
            who = f"phase {label(name)}"
            if any(p.name == name for p in phases):
                self.problems.add(who, "name", "duplicate phase name")
        self._keys(who, raw, PHASE_KEYS)
        barrier = self._get(who, raw, "barrier", boolean, False)
        phase = Phase(name or f"#{i + 1}", len(phases), bool(barrier))
        phases.append(phase)
        for j, exp in enumerate(self._get(who, raw, "experiments", nonempty_list("experiments")) or []):
            spec = self._experiment(phase, f"{who} experiment #{j + 1}", exp, merged)
            if spec is not None:
                specs.append(spec)

    def _experiment(self, phase: Phase, who: str, raw: object, merged: dict[str, Any]) -> Spec | None:
        if not isinstance(raw, Mapping):
            self.problems.add(who, "experiment", f"expected a mapping (name:, cmd:, ...), got {_show(raw)}")
            return None
        template = self._get(who, raw, "name", nonempty_text)
        who = label(template) if template is not None else who
        self._keys(who, raw, EXPERIMENT_KEYS)
        grid = self._grid(who, raw.get("grid", {}))
        keys = tuple(k for k, _ in grid)
        allowed = (*keys, *BUILTIN_PLACEHOLDERS)
        name = None
        if template is not None:
            name = self._field(who, "name", lambda t: compile_template(t, (*keys, *NAME_PLACEHOLDERS), True), template)
        cmd = self._get(who, raw, "cmd", lambda t: compile_template(nonempty_text(t), allowed))
        own = self._fields(who, raw)
        for key in (*TEMPLATED, "env"):
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
        return Spec(who, template or who, phase, name, cmd, grid, values,
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
                hint = f" (write [{_show(values)}])" if is_scalar(values) else ""
                self.problems.add(who, f"grid.{key}", f"expected a non-empty list of values, got {_show(values)}{hint}")
            elif bad := [v for v in values if not is_scalar(v)]:
                what = f"values must be strings or numbers, got {_show(bad[0])} (quote it)"
                self.problems.add(who, f"grid.{key}", what)
            else:
                grid.append((key, values))
        return grid


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
