"""`gpupack report RUN_DIR`: what the run did, from state.db alone, as files in <run>/report/.

    summary.json  per experiment: state, attempts (each with its GPUs, times, exit code, peak
                  memory, mean utilization), declared memory and time; per GPU and overall: busy
                  fraction (time with >= 1 occupant / wall time of the run's allocations) and mean
                  NVML utilization, with the plan's > 80 % busy target and whether it was met.
    report.html   self-contained (inline CSS, the timeline as inline SVG, see timeline.py): opens
                  from a login node or a laptop after scp, no server and no network. Experiments
                  are listed in collapsible groups per phase and state, with their counts.
    timeline.png  the same timeline drawn by matplotlib (extra [report]); written by `gpupack
                  report`, not at the end of `gpupack run` (matplotlib's import alone costs more
                  than the rest of a large run's report).

Every file is written to a temporary name and renamed, so a reader never sees half a report.
Units in summary.json are in the key names (_s, _bytes, _pct, _fraction); only the timeline and the
HTML humanize (through units.py, as the dashboard does).
"""

from __future__ import annotations

import html
import time
from collections import Counter, defaultdict
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .jsonout import dumps_rows
from .policy import GpuKey
from .runfacts import RunFacts, Window, gpu_key, gpu_label, load_facts, union_seconds
from .store import FAILED, INTERRUPTED, RUNNING, STATES, AttemptRow, ExperimentRow, Store
from .units import format_bytes, format_duration

if TYPE_CHECKING:  # drawing is imported when drawing (matplotlib-free start-up)
    from . import timeline

__all__ = [  # what other modules and tests take from here (runfacts.py holds the facts)
    "GpuKey", "RunFacts", "Window", "gpu_key", "gpu_label", "load_facts", "union_seconds", "summarize",
    "render_html", "write_report", "timeline_layout", "timeline_png", "TARGET_BUSY_FRACTION",
]

TARGET_BUSY_FRACTION = 0.8  # the seed plan: GPUs busy > 80 % of the allocation

def summarize(facts: RunFacts) -> dict[str, Any]:
    wall_s = facts.wall_s()
    by_gpu: dict[GpuKey, list[tuple[float, float]]] = defaultdict(list)
    by_exp: dict[str, list[AttemptRow]] = defaultdict(list)
    for a in facts.attempts:
        by_exp[a.experiment].append(a)
        for key in facts.attempt_keys(a):
            by_gpu[key].append((a.started_at, facts.attempt_end(a)))
    gpus = []
    for key, info in facts.gpus.items():
        busy_s, gpu_wall_s = union_seconds(by_gpu[key]), facts.wall_s(key)
        gpus.append(
            {
                "gpu": gpu_label(key, facts.single_node), "node": key[0], "index": key[1], "name": info["name"],
                "total_bytes": info["total_bytes"], "busy_s": busy_s, "wall_s": gpu_wall_s,
                "busy_fraction": busy_s / gpu_wall_s if gpu_wall_s > 0 else None,
                "mean_util_pct": facts.usage.get(key, (None, None))[0],
                "peak_used_bytes": facts.usage.get(key, (None, None))[1],
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
            "mean_util_pct": _mean([g["mean_util_pct"] for g in gpus if g["mean_util_pct"] is not None]),
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


def timeline_layout(facts: RunFacts, summary: dict[str, Any]) -> timeline.Layout:
    from . import timeline

    overall = summary["overall"]
    title = (f"{summary['run']}: GPUs busy {_pct(overall['busy_fraction'])} of {format_duration(summary['wall_s'])}"
             f" (target > {TARGET_BUSY_FRACTION:.0%}), mean utilization {_pct_value(overall['mean_util_pct'])}")
    return timeline.layout(facts, title, TARGET_BUSY_FRACTION * 100)


def timeline_png(lay: timeline.Layout) -> bytes | None:
    """timeline.png, or None when matplotlib is not installed (tests replace this)."""
    from . import timeline

    return timeline.png(lay)


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
.s-running{color:#1f5fbf} .s-pending,.s-skipped{color:#667} .figure{overflow-x:auto;border:1px solid #e3e7eb}
details{margin:6px 0} summary{cursor:pointer;font-weight:600} details table{margin:6px 0 12px 18px}
"""


GROUP_OPEN_MAX = 200  # a run of up to this many experiments shows every group open
GROUP_ROWS_MAX = 500  # rows listed per (phase, state) group; the rest are in summary.json


def render_html(summary: dict[str, Any], svg: str) -> str:
    e = html.escape
    overall, target = summary["overall"], summary["target"]
    met = "ok" if target["met"] else "bad"
    cards = [
        (f'<b class="{met}">{_pct(overall["busy_fraction"])}</b>GPU busy (target &gt; {target["busy_fraction"]:.0%})'),
        f"<b>{_pct_value(overall['mean_util_pct'])}</b>mean GPU utilization",
        f"<b>{format_duration(summary['wall_s'])}</b>wall time, {len(summary['windows'])} allocation(s)",
        f"<b>{summary['counts']['succeeded']}/{len(summary['experiments'])}</b>experiments succeeded",
    ]
    gpu_rows = [
        [e(g["gpu"]), e(g["name"] or ""), (format_bytes(g["total_bytes"]), "n"), (_pct(g["busy_fraction"]), "n"),
         (format_duration(g["busy_s"]), "n"), (_pct_value(g["mean_util_pct"]), "n"), (format_bytes(g["peak_used_bytes"]), "n")]
        for g in summary["gpus"]
    ]
    phase_rows = [[e(p["phase"]), (str(p["total"]), "n")] + [(str(p[s]), "n") for s in STATES] for p in summary["phases"]]
    windows = ", ".join(f"{_stamp(w['started_at'])} to {_stamp(w['ended_at'])}" for w in summary["windows"])
    return "\n".join(
        [
            "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>gpupack report: {e(summary['run'])}</title><style>{_CSS}</style></head><body>",
            f"<h1>gpupack report: {e(summary['run'])}</h1>",
            f'<div class="dim">{e(summary["manifest"])} &middot; generated {_stamp(summary["generated_at"])} &middot; {e(windows)}</div>',
            '<div class="cards">' + "".join(f'<div class="card">{c}</div>' for c in cards) + "</div>",
            "<h2>Timeline</h2>", f'<div class="figure">{svg}</div>',
            "<h2>GPUs</h2>", _table(["GPU", "model", "memory", "busy", "busy time", "mean util", "peak used"], gpu_rows),
            "<h2>Phases</h2>", _table(["phase", "total", *STATES], phase_rows),
            "<h2>Experiments</h2>", *_experiment_groups(summary["experiments"]),
            "</body></html>",
        ]
    )


def _experiment_groups(experiments: list[dict[str, Any]]) -> list[str]:
    """One collapsible table per (phase, state), in manifest order: a 10,000-experiment run reads
    as a few counted groups (failed ones first in each phase), not one endless table. Small runs
    show every group open; large ones open only what went wrong or is running, and list at most
    GROUP_ROWS_MAX rows of a group (summary.json has them all)."""
    e = html.escape
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for x in experiments:
        groups.setdefault((x["phase"], x["state"]), []).append(x)
    first_seen = {phase: i for i, phase in enumerate(dict.fromkeys(x["phase"] for x in experiments))}
    rank = {state: i for i, state in enumerate(dict.fromkeys((FAILED, INTERRUPTED, RUNNING, *STATES)))}
    small = len(experiments) <= GROUP_OPEN_MAX
    out = []
    for (phase, state), rows in sorted(groups.items(), key=lambda g: (first_seen[g[0][0]], rank[g[0][1]])):
        is_open = small or (state in (FAILED, INTERRUPTED, RUNNING) and len(rows) <= GROUP_OPEN_MAX)
        shown = rows[:GROUP_ROWS_MAX]
        more = f'<p class="dim">{len(rows) - len(shown)} more in summary.json</p>' if len(rows) > len(shown) else ""
        out.append(
            f'<details{" open" if is_open else ""}><summary>{e(phase)}: <span class="s-{e(state)}">{e(state)}</span>'
            f" ({len(rows)})</summary>"
            + _table(["experiment", "state", "attempts", "GPUs", "duration", "estimate", "peak / declared mem",
                      "mean util", "exit", "reason"], [_experiment_row(x) for x in shown])
            + more + "</details>"
        )
    return out


def _experiment_row(x: dict[str, Any]) -> list[Any]:
    e = html.escape
    peak = format_bytes(x["peak_bytes"]) + (f" / {format_bytes(x['mem_bytes'])}" if x["mem_bytes"] else "")
    exit_code = x["attempt_list"][-1]["exit_code"] if x["attempt_list"] else None
    return [
        e(x["name"]), (f'<span class="s-{e(x["state"])}">{e(x["state"])}</span>', ""),
        (str(x["attempts"]), "n"), e(", ".join(x["gpus"])),
        (format_duration(x["duration_s"]) if x["attempts"] else "", "n"),
        (format_duration(x["time_s"]) if x["time_s"] else "", "n"), (peak if x["attempts"] else "", "n"),
        (_pct_value(x["mean_util_pct"]) if x["attempts"] else "", "n"), ("" if exit_code is None else str(exit_code), "n"),
        e(x["reason"] or ""),
    ]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Cells are escaped text, or (html, css class) pairs."""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = (c if isinstance(c, tuple) else (c, "") for c in row)
        out.append("<tr>" + "".join(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>" for text, cls in cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def write_report(run_dir: Path, png: bool = True, out_dir: Path | None = None, store: Store | None = None) -> dict[str, Path]:
    """Writes summary.json, report.html (its timeline inline SVG) and, with png and matplotlib
    installed, timeline.png into out_dir (default <run>/report; another place for a read-only run
    directory); returns {"summary", "html", "timeline"} paths of the files written. Without png
    (the end of `gpupack run`: matplotlib's import alone costs half a second) an older
    timeline.png is removed rather than left beside a newer report. `store`: the run's database
    as reader.open_database gives it (opened here when not given)."""
    run_dir = Path(run_dir)
    if store is None:
        from .reader import open_database

        with closing(open_database(run_dir)) as own:
            return write_report(run_dir, png, out_dir, own)
    from .files import write_atomic  # whole files only: a reader never sees half a report

    facts = load_facts(store)
    summary = summarize(facts)
    lay = timeline_layout(facts, summary)
    image = timeline_png(lay) if png else None
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = {"summary": out / "summary.json", "html": out / "report.html"}
    summary["timeline_png"] = "timeline.png" if image is not None else None
    write_atomic(written["summary"], dumps_rows(summary, "experiments").encode())
    if image is not None:
        written["timeline"] = out / "timeline.png"
        write_atomic(written["timeline"], image)
    else:
        (out / "timeline.png").unlink(missing_ok=True)
    from . import timeline

    write_atomic(written["html"], render_html(summary, timeline.svg(lay)).encode())
    return written
