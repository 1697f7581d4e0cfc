"""Manifest expansion: checked experiment entries (`Spec`) -> one record per expanded experiment.

Owns the grid (the cartesian product of its values), placeholder substitution, the fingerprint,
dependency resolution (exact names, then globs in manifest order, with a nearest-name hint),
the barrier deadlock check and dependency cycles. Problems go to the shared `Problems`; the
`Experiment` objects themselves are built by manifest.py.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .manifest_fields import MAX_PROBLEMS_SHOWN, Problems, dirname_problem, label
from .templates import Template, nearest, render_scalar
from .units import show_value as _show


@dataclass(frozen=True)
class Phase:
    name: str
    index: int
    barrier: bool


@dataclass
class Spec:
    """One experiment entry, checked, not yet expanded."""

    who: str  # how messages name it: the template, or its position when that is unusable
    template: str
    phase: Phase
    name: Template | None
    cmd: Template | None
    grid: list[tuple[str, list[Any]]]
    values: dict[str, Any]  # every field of FIELDS, merged with defaults and built-ins
    depends_on: tuple[Template, ...]
    outputs: tuple[Template, ...]
    env: dict[str, Template]

    @property
    def count(self) -> int:
        return math.prod(len(values) for _, values in self.grid)


class Expansion:
    """Grid expansion, placeholder substitution, dependency resolution and graph checks."""

    def __init__(self, problems: Problems, run_dir: Path, workdir: Path, phases: list[Phase]):
        self.problems, self.run_dir, self.workdir, self.phases = problems, run_dir, workdir, phases
        self.globs: dict[str, list[str]] = {}
        self.sorted_names: list[str] = []
        self.order: dict[str, int] = {}

    def run(self, specs: list[Spec]) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
        """Each expanded experiment in manifest order: its Experiment fields but `order`, and its
        dependencies (exact names); empty when a name could not be read."""
        records: dict[str, tuple[Spec, dict[str, Any], list[str]]] = {}
        all_named = True
        for spec in specs:
            if spec.name is None:
                all_named = False
                continue
            for combo in itertools.product(*(values for _, values in spec.grid)):
                self._one(spec, dict(zip((k for k, _ in spec.grid), combo)), records)
        if not all_named:
            return []  # dependency checks against a partial list of names would mislead
        self.sorted_names, self.order = sorted(records), {n: i for i, n in enumerate(records)}
        graph = {name: self._resolve(name, spec, patterns, records) for name, (spec, _, patterns) in records.items()}
        for cycle in cycles(graph):
            shown = list(map(label, cycle))
            if len(shown) > 12:  # one line, even for a cycle through thousands
                shown = [*shown[:5], f"... ({len(shown) - 10} more)", *shown[-5:]]
            self.problems.add(shown[0], "depends_on", "dependency cycle: " + " -> ".join(shown))
        return [(built, graph[name]) for name, (_, built, _) in records.items()]

    def _one(self, spec: Spec, params: dict[str, Any], records: dict[str, Any]) -> None:
        values: dict[str, Any] = {**params, "phase": spec.phase.name, "gpus": spec.values["gpus"], "nodes": spec.values["nodes"]}
        texts = {k: render_scalar(v) for k, v in values.items()}

        def render(where: str, template: Template) -> str:
            try:
                return template.render(values, texts)
            except (ValueError, TypeError) as e:  # a format spec that doesn't suit this value
                self.problems.add(spec.who, where, f"can't format: {e}")
                return ""

        name = render("name", spec.name) if spec.name else ""
        why = dirname_problem(name)
        if why:
            self.problems.add(spec.who, "name", why)
            return
        if name in records:
            other = records[name][0]
            self.problems.add(spec.who, "name", f"duplicate experiment name {_show(name)} after expansion "
                              f"(also from {other.who}, phase {label(other.phase.name)}); "
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

    def _resolve(self, name: str, spec: Spec, patterns: list[str], records: dict[str, Any]) -> tuple[str, ...]:
        deps: dict[str, None] = {}
        for pattern in patterns:
            if pattern == name:
                self.problems.add(label(name), "depends_on", "depends on itself")
            elif pattern in records:  # exact, even when the name holds glob characters
                deps[pattern] = None
            elif any(c in pattern for c in "*?["):
                matched = [n for n in self._glob(pattern) if n != name]
                if not matched:
                    self.problems.add(label(name), "depends_on", f"{_show(pattern)} matches no other experiment")
                deps.update(dict.fromkeys(matched))
            else:
                # Past the shown lines, a suggestion is never read; each one scans every name.
                shown = len(self.problems.lines) < MAX_PROBLEMS_SHOWN
                hint = nearest(pattern, list(records), list_all=False) if shown else ""
                self.problems.add(label(name), "depends_on", f"{_show(pattern)} matches no experiment{hint}")
        for dep in deps:
            later = records[dep][0].phase
            between = self.phases[spec.phase.index + 1 : later.index + 1]  # empty unless `later` is later
            if any(p.barrier for p in between):
                self.problems.add(label(name), "depends_on", f"{_show(dep)} is in phase {label(later.name)}, "
                                  f"which waits at a barrier for phase {label(spec.phase.name)} to end: deadlock")
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


def cycles(graph: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
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
