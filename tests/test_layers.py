"""The import graph of gpupack is a tree of layers: cli on top, policy/units at the bottom, no cycle
and no import pointing to a higher layer. Read from the source with ast, so every import counts:
top-level, inside a function (lazy, for start-up time) and under TYPE_CHECKING alike; a lazy import
only postpones a dependency, it does not remove it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpupack"

# Top to bottom (docs/layout.md says what each layer is for); a module may import its own layer
# (the cycle check keeps that one-way) or lower.
LAYERS: list[tuple[str, set[str]]] = [
    ("entry", {"__init__", "__main__", "cli", "job"}),
    ("commands", {"commands"}),
    ("loop and views", {
        "engine", "simulate", "report", "results", "statedir", "reader", "timeline", "publish",
        "dashboard", "status", "runfacts",
    }),
    ("outside world", {
        "backend", "pool", "srun", "recovery", "slurm_nodes", "slurm_requeue", "slurm_steps", "slurm",
        "_reader", "launch", "gpus", "ranks", "procs", "runlock",
    }),
    ("model", {
        "request", "manifest", "manifest_fields", "manifest_yaml", "manifest_expansion", "templates",
        "estimates", "outcome", "hooks", "store", "store_schema", "store_experiments", "store_attempts",
        "store_history", "states", "jsonout",
    }),
    ("base", {"policy", "policy_view", "policy_types", "units", "signals", "exits", "files"}),
]


def _top(dotted: str) -> str | None:
    """gpupack.x.y -> x (a sub-package counts as one module of its layer)."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "gpupack" and len(parts) > 1 else None


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the gpupack modules it imports, by top-level name under the package."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        dotted = ".".join(rel.parts)
        is_init = path.name == "__init__.py"
        here = dotted.removesuffix(".__init__") if is_init else dotted
        name = _top(here) or "__init__"
        edges = graph.setdefault(name, set())
        pkg = here if is_init else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            for target in targets:
                top = _top(target)
                if top is not None and top != name and ((package / f"{top}.py").exists() or (package / top).is_dir()):
                    edges.add(top)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[str]:
    """'a (layer) imports b (higher layer)' for each import that points up."""
    level = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    names = [n for n, _ in LAYERS]
    return [
        f"{a} ({names[level[a]]}) imports {b} ({names[level[b]]})"
        for a in sorted(graph) for b in sorted(graph[a])
        if a in level and b in level and level[b] < level[a]
    ]


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_no_import_points_to_a_higher_layer() -> None:
    assert upward(import_graph()) == []


def test_every_module_has_its_layer() -> None:
    placed = {m for _, mods in LAYERS for m in mods}
    unplaced = sorted(set(import_graph()) - placed)
    assert unplaced == [], f"give {unplaced} a layer in LAYERS here (and a line in docs/layout.md)"


def test_the_checks_see_lazy_and_type_only_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "gpupack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "policy.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .engine import X\n")
    (pkg / "engine.py").write_text("def f():\n    from gpupack import slurm\n")
    (pkg / "slurm.py").write_text("from . import policy\n")
    graph = import_graph(pkg)
    assert graph["engine"] == {"slurm"} and graph["policy"] == {"engine"}
    assert cycles(graph) == [["engine", "policy", "slurm"]]
    assert upward(graph) == ["policy (base) imports engine (loop and views)"]
