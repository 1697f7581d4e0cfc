"""`gpupack report RUN_DIR`: what the run did, from state.db alone, as three files in <run>/report/.

    summary.json  per experiment: state, attempts (each with its GPUs, times, exit code, peak
                  memory, mean utilization), declared memory and time; per GPU and overall: busy
                  fraction (time with >= 1 occupant / wall time of the run's allocations) and mean
                  NVML utilization, with the plan's > 80 % busy target and whether it was met.
    timeline.png  one lane per GPU with each attempt as a bar coloured by phase (co-located
                  attempts share the lane in sub-rows; failed hatched x, interrupted /), and the
                  utilization curve of every GPU below. Needs matplotlib (extra [report]).
    report.html   self-contained (inline CSS, the PNG as a data URI): opens from a login node
                  or a laptop after scp, no server and no network.

Every file is written to a temporary name and renamed, so a reader never sees half a report.
Units in summary.json are in the key names (_s, _bytes, _pct, _fraction); only the PNG and the
HTML humanize (through units.py, as the dashboard does).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import FAILED, INTERRUPTED, STATES, AttemptRow, ExperimentRow, Store
from .units import format_bytes, format_duration

TARGET_BUSY_FRACTION = 0.8  # the seed plan: GPUs busy > 80 % of the allocation

GpuKey = tuple[str, int]


def gpu_label(key: GpuKey, single_node: bool) -> str:
    return f"gpu{key[1]}" if single_node else f"{key[0]}:gpu{key[1]}"


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one occupant."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@dataclass(frozen=True)
class Window:
    """One run of the run directory: an allocation, from the scheduler's start to its end."""

    start: float
    end: float
    gpus: frozenset[GpuKey] | None  # the run's inventory; None where it was not recorded


@dataclass(frozen=True)
class RunFacts:
    """Everything the report needs, read once from the store."""

    meta: dict[str, str]
    experiments: list[ExperimentRow]
    attempts: list[AttemptRow]
    samples: list[tuple[float, str, int, float | None, int | None, int]]
    windows: list[Window]  # in time order
    gpus: dict[GpuKey, dict[str, Any]]  # every GPU the run had: name, total_bytes

    @property
    def single_node(self) -> bool:
        return len({key[0] for key in self.gpus}) <= 1

    def attempt_end(self, attempt: AttemptRow) -> float:
        """A running (or orphaned) attempt lasts until the end of the allocation it started in."""
        if attempt.ended_at is not None:
            return attempt.ended_at
        for w in self.windows:
            if w.start <= attempt.started_at <= w.end:
                return w.end
        return max(attempt.started_at, self.windows[-1].end if self.windows else attempt.started_at)

    def attempt_keys(self, attempt: AttemptRow) -> list[GpuKey]:
        return [gpu_key(self.gpus, n, g) for n, g in attempt.keys]

    def wall_s(self, key: GpuKey | None = None) -> float:
        """Allocated time: of the whole run, or of the runs that had this GPU."""
        return sum(w.end - w.start for w in self.windows if key is None or w.gpus is None or key in w.gpus)


def gpu_key(inventory: Mapping[GpuKey, Any], node: str, index: int) -> GpuKey:
    """An attempt recorded without a node (local run) belongs to the one node of the inventory."""
    if not node:
        nodes = {k[0] for k in inventory}
        if len(nodes) == 1:
            return (next(iter(nodes)), index)
    return (node, index)


def load_facts(store: Store) -> RunFacts:
    meta = store.meta()
    experiments = [e for e in store.experiments() if e.in_manifest]
    attempts = store.attempts()
    samples = store.gpu_samples()
    gpus: dict[GpuKey, dict[str, Any]] = {}
    try:
        for g in json.loads(meta.get("gpus") or "[]"):
            gpus[(str(g["node"]), int(g["index"]))] = {"name": g.get("name", ""), "total_bytes": g.get("total_bytes")}
    except (ValueError, TypeError, KeyError):
        pass  # an unreadable inventory only loses GPU names; runs, samples and attempts still name the GPUs
    windows = _windows(store, attempts, samples)
    for w in windows:
        for key in w.gpus or ():
            gpus.setdefault(key, {"name": "", "total_bytes": None})
    for _t, node, index, _util, _used, total in samples:
        gpus.setdefault((node, index), {"name": "", "total_bytes": total})
    for a in attempts:
        for n, g in a.keys:
            gpus.setdefault(gpu_key(gpus, n, g), {"name": "", "total_bytes": None})
    return RunFacts(meta, experiments, attempts, samples, windows, dict(sorted(gpus.items())))


def _run_gpus(text: object) -> frozenset[GpuKey] | None:
    """runs.gpus as the engine writes it: "node:index:total_bytes,..." (node names hold no ':')."""
    try:
        keys = [part.rsplit(":", 2) for part in str(text or "").split(",") if part]
        return frozenset((node, int(index)) for node, index, _total in keys) or None
    except ValueError:
        return None


def _windows(store: Store, attempts: list[AttemptRow], samples: list[tuple[Any, ...]]) -> list[Window]:
    """Each run's window. A run that did not record its end (killed, or still going) ends at
    its last sign of life: a sample, an event or an attempt time before the next run began."""
    activity = sorted(
        [s[0] for s in samples]
        + [e.t for e in store.events()]
        + [a.started_at for a in attempts]
        + [a.ended_at for a in attempts if a.ended_at is not None]
    )
    runs = store.runs()
    if not runs:
        return [Window(activity[0], activity[-1], None)] if activity else []
    windows = []
    for i, run in enumerate(runs):
        start = float(str(run["started_at"]))
        if run["ended_at"] is not None:
            end = float(str(run["ended_at"]))
        else:
            limit = float(str(runs[i + 1]["started_at"])) if i + 1 < len(runs) else float("inf")
            end = max([t for t in activity if start <= t < limit], default=start)
        windows.append(Window(start, end, _run_gpus(run["gpus"])))
    return windows


def summarize(facts: RunFacts) -> dict[str, Any]:
    wall_s = facts.wall_s()
    by_gpu: dict[GpuKey, list[tuple[float, float]]] = defaultdict(list)
    by_exp: dict[str, list[AttemptRow]] = defaultdict(list)
    for a in facts.attempts:
        by_exp[a.experiment].append(a)
        for key in facts.attempt_keys(a):
            by_gpu[key].append((a.started_at, facts.attempt_end(a)))
    utils: dict[GpuKey, list[float]] = defaultdict(list)
    peaks: dict[GpuKey, int] = {}
    for _t, node, index, util, used, _total in facts.samples:
        if util is not None:
            utils[(node, index)].append(util)
        if used is not None:
            peaks[(node, index)] = max(used, peaks.get((node, index), 0))
    gpus = []
    for key, info in facts.gpus.items():
        busy_s, gpu_wall_s = union_seconds(by_gpu[key]), facts.wall_s(key)
        gpus.append(
            {
                "gpu": gpu_label(key, facts.single_node), "node": key[0], "index": key[1], "name": info["name"],
                "total_bytes": info["total_bytes"], "busy_s": busy_s, "wall_s": gpu_wall_s,
                "busy_fraction": busy_s / gpu_wall_s if gpu_wall_s > 0 else None,
                "mean_util_pct": _mean(utils[key]), "peak_used_bytes": peaks.get(key),
            }
        )
    busy_total = sum(g["busy_s"] for g in gpus)
    gpu_wall_total = sum(g["wall_s"] for g in gpus)
    overall_fraction = busy_total / gpu_wall_total if gpu_wall_total > 0 else None
    phases: dict[str, Counter[str]] = {}
    for e in facts.experiments:
        phases.setdefault(e.phase, Counter())[e.state] += 1
    return {
        "run": facts.meta.get("run_name", ""),
        "manifest": facts.meta.get("manifest", ""),
        "generated_at": time.time(),
        "windows": [{"started_at": w.start, "ended_at": w.end, "wall_s": w.end - w.start} for w in facts.windows],
        "wall_s": wall_s,
        "target": {"busy_fraction": TARGET_BUSY_FRACTION, "met": overall_fraction is not None and overall_fraction > TARGET_BUSY_FRACTION},
        "overall": {
            "gpus": len(gpus), "busy_fraction": overall_fraction, "busy_gpu_s": busy_total,
            "mean_util_pct": _mean([u for us in utils.values() for u in us]),
        },
        "counts": {s: sum(c[s] for c in phases.values()) for s in STATES},
        "phases": [{"phase": p, "total": sum(c.values()), **{s: c[s] for s in STATES}} for p, c in phases.items()],
        "gpus": gpus,
        "experiments": [_experiment(e, by_exp[e.name], facts) for e in facts.experiments],
    }


def _experiment(e: ExperimentRow, attempts: list[AttemptRow], facts: RunFacts) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for a in attempts:
        end = facts.attempt_end(a)
        rows.append(
            {
                "number": a.number, "state": a.state, "started_at": a.started_at, "ended_at": a.ended_at,
                "duration_s": end - a.started_at, "exit_code": a.exit_code, "node": a.node,
                "gpus": [gpu_label(k, facts.single_node) for k in facts.attempt_keys(a)],
                "budget_bytes": a.budget_bytes, "peak_bytes": a.peak_bytes, "mean_util_pct": a.mean_util,
                "oom": a.oom, "note": a.note,
            }
        )
    peaks = [a.peak_bytes for a in attempts if a.peak_bytes is not None]
    weighted = [(r["mean_util_pct"], r["duration_s"]) for r in rows if r["mean_util_pct"] is not None]
    weight = sum(w for _, w in weighted)
    return {
        "name": e.name, "phase": e.phase, "state": e.state, "reason": e.reason, "params": dict(e.params),
        "attempts": len(rows), "gpus": rows[-1]["gpus"] if rows else [],
        "mem_bytes": e.spec.get("mem_bytes"), "time_s": e.spec.get("time_s"),
        "duration_s": rows[-1]["duration_s"] if rows else None,  # the latest attempt
        "total_s": sum(r["duration_s"] for r in rows),  # every attempt, retries and resumes included
        "peak_bytes": max(peaks) if peaks else None,
        "mean_util_pct": sum(u * w for u, w in weighted) / weight if weight > 0 else None,
        "attempt_list": rows,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def timeline_png(facts: RunFacts, summary: dict[str, Any]) -> bytes | None:
    """The timeline as PNG bytes, or None when matplotlib is not installed."""
    try:
        # Figure without pyplot: no global backend switch and no display needed on a compute node.
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return None
    t0 = facts.windows[0].start if facts.windows else 0.0
    span = max((facts.windows[-1].end - t0) if facts.windows else 0.0, 1.0)
    unit, scale = ("h", 3600.0) if span >= 7200 else ("min", 60.0) if span >= 120 else ("s", 1.0)
    keys = list(facts.gpus)
    phases = list(dict.fromkeys(e.phase for e in facts.experiments))
    colours = {p: colormaps["tab10"](i % 10) for i, p in enumerate(phases)}
    phase_of = {e.name: e.phase for e in facts.experiments}
    fig = Figure(figsize=(12, 2.5 + 0.7 * max(len(keys), 1)), layout="constrained")
    lanes, curve = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(len(keys), 1) * 0.7, 2.0]})
    for row, key in enumerate(keys):
        y = len(keys) - 1 - row  # the first GPU on top
        bars = sorted(
            ((a.started_at, facts.attempt_end(a), a) for a in facts.attempts if key in facts.attempt_keys(a)),
            key=lambda bar: bar[:2],
        )
        sub_ends: list[float] = []  # greedy sub-rows: co-located attempts stack inside the lane
        placed = []
        for start, end, a in bars:
            sub = next((i for i, e in enumerate(sub_ends) if e <= start), len(sub_ends))
            sub_ends[sub:sub + 1] = [end]
            placed.append((start, end, a, sub))
        height = 0.8 / max(len(sub_ends), 1)
        for start, end, a, sub in placed:
            hatch = "xx" if a.state == FAILED else "//" if a.state == INTERRUPTED else None
            lanes.broken_barh(
                [((start - t0) / scale, max(end - start, span / 2000) / scale)], (y - 0.4 + sub * height, height * 0.92),
                facecolors=colours.get(phase_of.get(a.experiment, ""), "grey"), edgecolor="black", linewidth=0.4, hatch=hatch,
            )
            if (end - start) / span > 0.07 and height >= 0.2:
                lanes.text(((start + end) / 2 - t0) / scale, y - 0.4 + (sub + 0.46) * height, a.experiment,
                           ha="center", va="center", fontsize=6, clip_on=True)
    for before, after in zip(facts.windows, facts.windows[1:]):  # between allocations: nothing could run
        for ax in (lanes, curve):
            ax.axvspan((before.end - t0) / scale, (after.start - t0) / scale, color="0.85", zorder=0)
    lanes.set_yticks(range(len(keys)), [gpu_label(k, facts.single_node) for k in reversed(keys)])
    lanes.set_ylim(-0.6, len(keys) - 0.4)
    handles = [Patch(facecolor=colours[p], edgecolor="black", label=p) for p in phases]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="xx", label="failed"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="interrupted")]
    if len(facts.windows) > 1:
        handles.append(Patch(facecolor="0.85", label="no allocation"))
    lanes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    overall = summary["overall"]
    lanes.set_title(
        f"{summary['run']}: GPUs busy {_pct(overall['busy_fraction'])} of {format_duration(summary['wall_s'])}"
        f" (target > {TARGET_BUSY_FRACTION:.0%}), mean utilization {_pct_value(overall['mean_util_pct'])}", fontsize=10,
    )
    readings: dict[GpuKey, list[tuple[float, float]]] = defaultdict(list)
    for t, node, index, util, _used, _total in facts.samples:
        if util is not None:
            readings[(node, index)].append((t, util))
    for key in keys:
        xs, ys = _util_steps(readings[key], facts.windows)
        if xs:
            curve.plot([(x - t0) / scale for x in xs], ys, linewidth=0.9, drawstyle="steps-post",
                       label=gpu_label(key, facts.single_node))
    curve.axhline(TARGET_BUSY_FRACTION * 100, color="0.4", linestyle="--", linewidth=0.8, label=f"{TARGET_BUSY_FRACTION:.0%} target")
    curve.set_ylim(0, 105)
    curve.set_ylabel("utilization %")
    curve.set_xlabel(f"time since start ({unit})")
    if facts.samples:
        curve.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _util_steps(readings: list[tuple[float, float]], windows: list[Window]) -> tuple[list[float], list[float]]:
    """A GPU's (time, util) readings as steps: a reading holds until the next one or the end of
    its allocation, and the line breaks (NaN) between allocations instead of bridging the gap."""
    xs: list[float] = []
    ys: list[float] = []
    for w in windows:
        points = [(t, u) for t, u in readings if w.start <= t <= w.end]
        if points:
            xs += [t for t, _ in points] + [w.end, w.end]
            ys += [u for _, u in points] + [points[-1][1], math.nan]
    return xs, ys


def _pct(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.0%}"


def _pct_value(pct: float | None) -> str:
    return "n/a" if pct is None else f"{pct:.0f}%"


def _stamp(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d232b;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px} .dim{color:#667}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0} .card{border:1px solid #d6dbe1;border-radius:8px;padding:10px 16px}
.card b{display:block;font-size:24px} .ok{color:#17803d} .bad{color:#b42318}
table{border-collapse:collapse;font-size:13px} th,td{padding:4px 10px;border-bottom:1px solid #e3e7eb;text-align:left}
th{background:#f3f5f7} td.n{text-align:right;font-variant-numeric:tabular-nums}
.s-succeeded{color:#17803d} .s-failed{color:#b42318;font-weight:600} .s-interrupted{color:#b54708}
.s-running{color:#1f5fbf} .s-pending,.s-skipped{color:#667} img{max-width:100%;border:1px solid #e3e7eb}
"""


def render_html(summary: dict[str, Any], png: bytes | None) -> str:
    e = html.escape
    overall, target = summary["overall"], summary["target"]
    met = "ok" if target["met"] else "bad"
    cards = [
        (f'<b class="{met}">{_pct(overall["busy_fraction"])}</b>GPU busy (target &gt; {target["busy_fraction"]:.0%})'),
        f"<b>{_pct_value(overall['mean_util_pct'])}</b>mean GPU utilization",
        f"<b>{format_duration(summary['wall_s'])}</b>wall time, {len(summary['windows'])} allocation(s)",
        f"<b>{summary['counts']['succeeded']}/{len(summary['experiments'])}</b>experiments succeeded",
    ]
    if png is not None:
        figure = f'<img alt="timeline" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    else:
        figure = '<p class="dim">No timeline: matplotlib is not installed (pip install "gpupack[report]").</p>'
    gpu_rows = [
        [e(g["gpu"]), e(g["name"] or ""), (format_bytes(g["total_bytes"]), "n"), (_pct(g["busy_fraction"]), "n"),
         (format_duration(g["busy_s"]), "n"), (_pct_value(g["mean_util_pct"]), "n"), (format_bytes(g["peak_used_bytes"]), "n")]
        for g in summary["gpus"]
    ]
    phase_rows = [[e(p["phase"]), (str(p["total"]), "n")] + [(str(p[s]), "n") for s in STATES] for p in summary["phases"]]
    exp_rows = []
    for x in summary["experiments"]:
        peak = format_bytes(x["peak_bytes"]) + (f" / {format_bytes(x['mem_bytes'])}" if x["mem_bytes"] else "")
        exit_code = x["attempt_list"][-1]["exit_code"] if x["attempt_list"] else None
        exp_rows.append(
            [e(x["name"]), e(x["phase"]), (f'<span class="s-{e(x["state"])}">{e(x["state"])}</span>', ""),
             (str(x["attempts"]), "n"), e(", ".join(x["gpus"])),
             (format_duration(x["duration_s"]) if x["attempts"] else "", "n"),
             (format_duration(x["time_s"]) if x["time_s"] else "", "n"), (peak if x["attempts"] else "", "n"),
             (_pct_value(x["mean_util_pct"]) if x["attempts"] else "", "n"), ("" if exit_code is None else str(exit_code), "n"),
             e(x["reason"] or "")]
        )
    windows = ", ".join(f"{_stamp(w['started_at'])} to {_stamp(w['ended_at'])}" for w in summary["windows"])
    return "\n".join(
        [
            "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>gpupack report: {e(summary['run'])}</title><style>{_CSS}</style></head><body>",
            f"<h1>gpupack report: {e(summary['run'])}</h1>",
            f'<div class="dim">{e(summary["manifest"])} &middot; generated {_stamp(summary["generated_at"])} &middot; {e(windows)}</div>',
            '<div class="cards">' + "".join(f'<div class="card">{c}</div>' for c in cards) + "</div>",
            "<h2>Timeline</h2>", figure,
            "<h2>GPUs</h2>", _table(["GPU", "model", "memory", "busy", "busy time", "mean util", "peak used"], gpu_rows),
            "<h2>Phases</h2>", _table(["phase", "total", *STATES], phase_rows),
            "<h2>Experiments</h2>",
            _table(["experiment", "phase", "state", "attempts", "GPUs", "duration", "estimate", "peak / declared mem",
                    "mean util", "exit", "reason"], exp_rows),
            "</body></html>",
        ]
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Cells are escaped text, or (html, css class) pairs."""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = (c if isinstance(c, tuple) else (c, "") for c in row)
        out.append("<tr>" + "".join(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>" for text, cls in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(run_dir: Path) -> dict[str, Path]:
    """Writes report/summary.json, report/timeline.png (only with matplotlib) and report/report.html;
    returns {"summary": path, "timeline": path, "html": path} for the files written."""
    run_dir = Path(run_dir)
    store = Store(run_dir / "state.db", readonly=True)
    try:
        facts = load_facts(store)
    finally:
        store.close()
    summary = summarize(facts)
    png = timeline_png(facts, summary)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    written = {"summary": out / "summary.json", "html": out / "report.html"}
    summary["timeline_png"] = "timeline.png" if png is not None else None
    _write_atomic(written["summary"], (json.dumps(summary, indent=2) + "\n").encode())
    if png is not None:
        written["timeline"] = out / "timeline.png"
        _write_atomic(written["timeline"], png)
    _write_atomic(written["html"], render_html(summary, png).encode())
    return written
