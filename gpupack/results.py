"""`gpupack results RUN_DIR`: the experiments' results.json files as one table, mean +- 95% CI over seeds.

collect() reads <run>/exp/<name>/results.json of every succeeded experiment. aggregate() groups
them within each experiment family (the manifest's name template) by the grid parameters other
than the seed (`seed`, `seeds`), or by the keys given with --by, and reduces every numeric metric
(nested dicts flattened with dots: {"loss": {"final": x}} -> loss.final) to mean, standard
deviation and the half-width of the 95% confidence interval of the mean, Student t with n - 1
degrees of freedom. A results.json usually echoes the config it ran under "config"/"args"/
"params", and may repeat grid values: neither is a metric, both are left out.

    | experiment          | task | metric   | n | mean ± 95% CI |
    | bridge-sst2-s{seed} | sst2 | accuracy | 3 | 0.840 ± 0.099 |
"""

from __future__ import annotations

from contextlib import closing

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import SUCCEEDED, Store

SEED_KEYS = frozenset({"seed", "seeds"})
CONFIG_KEYS = frozenset({"config", "args", "params"})  # the config a script echoes, not its metrics

# t quantile 0.975 for df = 1..30 (scipy.stats.t.ppf); beyond, the Cornish-Fisher expansion
# below is exact to 1e-7, so no scipy is needed.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)
_Z975 = 1.959963984540054


def t975(df: int) -> float:
    """Two-sided 95% Student t quantile."""
    if df < 1:
        raise ValueError("t quantile needs df >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4)
    )


@dataclass(frozen=True)
class Stat:
    n: int
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for n = 1
    ci95: float | None  # half-width of the 95% CI of the mean; None for n = 1
    min: float
    max: float


def describe(values: Sequence[float]) -> Stat:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Stat(n, mean, None, None, min(values), max(values))
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Stat(n, mean, std, t975(n - 1) * std / math.sqrt(n), min(values), max(values))


@dataclass(frozen=True)
class Row:
    experiment: str  # the family, with the grouped values filled in: bridge-sst2-s{seed}
    group: Mapping[str, object]  # the grouping keys' values
    metric: str
    stat: Stat
    members: tuple[str, ...]  # experiment names pooled in this row


@dataclass(frozen=True)
class ResultsTable:
    keys: tuple[str, ...]  # grouping columns, in first-seen order
    rows: tuple[Row, ...]


def collect(run_dir: Path, problems: list[str] | None = None, store: Store | None = None) -> list[dict[str, Any]]:
    """One dict per succeeded experiment with a results.json: name, template, phase, params,
    results. An unreadable results.json is skipped, with a line appended to `problems`. `store`:
    the run's database as reader.open_database gives it (opened here when not given)."""
    run_dir = Path(run_dir)
    if store is None:
        from .reader import open_database

        with closing(open_database(run_dir)) as own:
            return collect(run_dir, problems, own)
    experiments = [e for e in store.experiments() if e.in_manifest and e.state == SUCCEEDED]
    rows = []
    for e in experiments:
        path = run_dir / "exp" / e.name / "results.json"
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # not every experiment reports metrics
        except (OSError, ValueError) as exc:
            if problems is not None:
                problems.append(f"{path}: {e.name}: results.json: cannot read it ({exc})")
            continue
        if not isinstance(results, dict):
            if problems is not None:
                problems.append(f"{path}: {e.name}: results.json: expected a JSON object")
            continue
        rows.append({"name": e.name, "template": e.template, "phase": e.phase, "params": dict(e.params), "results": results})
    return rows


def flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves with dotted names; booleans, strings, lists and NaN are not metrics."""
    out: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def aggregate(rows: Sequence[Mapping[str, Any]], by: Sequence[str] | None = None) -> ResultsTable:
    """Group within each family by `by` (default: every grid key but the seed), metric by metric.
    ValueError names a --by key that no experiment's grid has."""
    if by is not None:
        known = {k for row in rows for k in row["params"]}
        unknown = [k for k in by if k not in known]
        if unknown and rows:
            raise ValueError(f"--by: no experiment has a grid key {', '.join(unknown)} (grid keys: {', '.join(sorted(known)) or 'none'})")
    keys: dict[str, None] = {}
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Mapping[str, Any]]] = {}
    for row in rows:
        params: Mapping[str, object] = row["params"]
        chosen = list(by) if by is not None else [k for k in params if k.lower() not in SEED_KEYS]
        group = tuple((k, json.dumps(params.get(k), sort_keys=True)) for k in chosen)
        keys.update(dict.fromkeys(chosen))
        groups.setdefault((row["template"], group), []).append(row)
    out = []
    for (template, group), members in groups.items():
        values: dict[str, list[float]] = {}
        for m in members:
            skip = set(m["params"])
            metrics = {k: v for k, v in m["results"].items() if k not in CONFIG_KEYS}
            for name, value in flatten(metrics).items():
                if name.rsplit(".", 1)[-1] not in skip:
                    values.setdefault(name, []).append(value)
        shown = {k: json.loads(v) for k, v in group}
        names = tuple(m["name"] for m in members)
        for metric, vs in values.items():
            out.append(Row(_fill(template, shown), shown, metric, describe(vs), names))
    return ResultsTable(tuple(keys), tuple(out))


class _Keep(dict[str, object]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _fill(template: str, values: Mapping[str, object]) -> str:
    """bridge-{task}-s{seed} with task=sst2 -> bridge-sst2-s{seed}: the pooled keys stay visible."""
    try:
        return template.format_map(_Keep(values))
    except (ValueError, IndexError, AttributeError):
        return template


def _round(mean: float, ci: float | None) -> tuple[str, str]:
    """Mean to the decimal place of the CI's second significant digit: 0.84 +- 0.0994 -> 0.840, 0.099."""
    if ci is None or ci == 0 or not math.isfinite(ci):
        return f"{mean:.4g}", "" if ci is None else "0"
    places = max(0, 1 - math.floor(math.log10(abs(ci))))
    return f"{mean:.{places}f}", f"{ci:.{places}f}"


def render(table: ResultsTable, fmt: str = "md") -> str:
    """md: a Markdown table to read or paste; csv and json: every number at full precision."""
    columns = ["experiment", *table.keys, "metric", "n", "mean", "ci95", "std", "min", "max"]
    records = [
        {
            "experiment": r.experiment, **{k: r.group.get(k) for k in table.keys}, "metric": r.metric, "n": r.stat.n,
            "mean": r.stat.mean, "ci95": r.stat.ci95, "std": r.stat.std, "min": r.stat.min, "max": r.stat.max,
        }
        for r in table.rows
    ]
    if fmt == "json":
        return json.dumps(records, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records)
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"unknown format {fmt!r} (md, csv or json)")
    if not records:
        return "no results: no succeeded experiment has a results.json\n"
    header = ["experiment", *table.keys, "metric", "n", "mean ± 95% CI"]
    lines = []
    for r in table.rows:
        mean, ci = _round(r.stat.mean, r.stat.ci95)
        value = f"{mean} ± {ci}" if ci else mean
        lines.append([r.experiment, *(_cell(r.group.get(k)) for k in table.keys), r.metric, str(r.stat.n), value])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {len(header) - 2, len(header) - 1}  # n, mean ± CI

    def fmt_row(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt_row(header), sep, *(fmt_row(line) for line in lines)]) + "\n"


def _cell(value: object) -> str:
    return "" if value is None else str(value)
