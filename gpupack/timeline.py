"""The report's timeline: one lane per GPU with each attempt as a bar coloured by phase
(co-located attempts share the lane in sub-rows; failed hatched x, interrupted /), the gaps
between allocations in grey, and the utilization curve of every GPU below.

The layout is computed once (`layout`), then drawn twice: as inline SVG for report.html (plain
string building, no plotting library, so the end of a `gpupack run` stays cheap) and as
timeline.png with matplotlib for `gpupack report`. Both draw one element per (phase, state)
group of bars, never one per attempt: 10,000 attempts are 10,000 sub-paths of a few paths, which
costs milliseconds, where an artist per attempt cost matplotlib seconds.
"""

from __future__ import annotations

import heapq
import html
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .runfacts import RunFacts, gpu_label
from .store import FAILED, INTERRUPTED

MAX_SUB_ROWS = 8  # more co-located attempts than this overlap in a lane instead of becoming hairlines
# matplotlib's tab10, so that the SVG and the PNG colour phases alike
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
HATCH = {FAILED: "failed", INTERRUPTED: "interrupted"}  # attempt state -> hatch kind


@dataclass(frozen=True)
class Bar:
    x0_s: float  # seconds since the first allocation's start
    x1_s: float
    y: float  # top edge in lane units: lane i (0 = the first GPU, drawn on top) spans [i, i + 1)
    height: float
    phase: int  # index into Layout.phases; -1 for an experiment no longer in the manifest
    hatch: str | None  # None, "failed" or "interrupted"
    name: str


@dataclass(frozen=True)
class Layout:
    span_s: float
    unit: str  # axis unit: "s", "min" or "h"
    unit_s: float
    lanes: list[str]  # GPU labels, top first
    phases: list[str]
    bars: list[Bar]
    gaps: list[tuple[float, float]]  # between allocations: nothing could run
    curves: list[tuple[str, list[float], list[float]]]  # GPU label, xs (s), util % (NaN breaks the line)
    title: str
    target_pct: float  # drawn as a dashed line over the utilization curves

    def groups(self) -> dict[tuple[int, str | None], list[Bar]]:
        """Bars by (phase, hatch): each group is drawn as one element."""
        out: dict[tuple[int, str | None], list[Bar]] = defaultdict(list)
        for bar in self.bars:
            out[(bar.phase, bar.hatch)].append(bar)
        return out

    def colour(self, phase: int) -> str:
        return PALETTE[phase % len(PALETTE)] if phase >= 0 else "#999999"

    def labelled(self) -> list[Bar]:
        """Bars wide and tall enough to carry their experiment's name."""
        return [b for b in self.bars if (b.x1_s - b.x0_s) / self.span_s > 0.07 and b.height >= 0.2]


def _sub_rows(bars: list[tuple[float, float, Any]]) -> tuple[list[int], int]:
    """Greedy interval colouring, O(n log n): each bar takes the lowest sub-row free at its start."""
    free: list[int] = []
    busy: list[tuple[float, int]] = []  # (end, row)
    rows, count = [], 0
    for start, end, _ in bars:
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        row = heapq.heappop(free) if free else count
        count = max(count, row + 1)
        heapq.heappush(busy, (end, row))
        rows.append(row)
    return rows, count


def layout(facts: RunFacts, title: str, target_pct: float) -> Layout:
    t0 = facts.windows[0].start if facts.windows else 0.0
    span = max((facts.windows[-1].end - t0) if facts.windows else 0.0, 1.0)
    unit, unit_s = ("h", 3600.0) if span >= 7200 else ("min", 60.0) if span >= 120 else ("s", 1.0)
    keys = list(facts.gpus)
    lane_of = {key: i for i, key in enumerate(keys)}
    phases = list(dict.fromkeys(e.phase for e in facts.experiments))
    phase_index = {p: i for i, p in enumerate(phases)}
    phase_of = {e.name: phase_index[e.phase] for e in facts.experiments}
    per_lane: dict[int, list[tuple[float, float, Any]]] = defaultdict(list)
    for a in facts.attempts:
        end = facts.attempt_end(a)
        for key in facts.attempt_keys(a):
            if key in lane_of:
                per_lane[lane_of[key]].append((a.started_at, end, a))
    bars: list[Bar] = []
    min_width = span / 2000  # a bar of a second in a day still shows
    for lane, items in per_lane.items():
        items.sort(key=lambda item: (item[0], item[1]))
        rows, count = _sub_rows(items)
        count = min(count, MAX_SUB_ROWS)
        height = 0.8 / count
        for (start, end, a), row in zip(items, rows):
            bars.append(Bar(start - t0, start - t0 + max(end - start, min_width), lane + 0.1 + (row % count) * height,
                            height, phase_of.get(a.experiment, -1), HATCH.get(a.state), a.experiment))
    gaps = [(before.end - t0, after.start - t0) for before, after in zip(facts.windows, facts.windows[1:])]
    readings: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for t, node, index, util, _used, _total in facts.samples:
        if util is not None:
            readings[(node, index)].append((t, util))
    curves = []
    for key in keys:
        xs, ys = util_steps(readings[key], facts.windows)
        if xs:
            curves.append((gpu_label(key, facts.single_node), [x - t0 for x in xs], ys))
    labels = [gpu_label(k, facts.single_node) for k in keys]
    return Layout(span, unit, unit_s, labels, phases, bars, gaps, curves, title, target_pct)


def util_steps(readings: list[tuple[float, float]], windows: list[Any]) -> tuple[list[float], list[float]]:
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


def _ticks(span: float, unit_s: float) -> list[float]:
    """Round tick positions (in seconds) along [0, span]: steps of 1, 2 or 5 x 10^k units, 4-10 ticks."""
    extent = span / unit_s
    step = 10 ** math.floor(math.log10(max(extent, 1e-9)))
    for factor in (0.1, 0.2, 0.5, 1, 2, 5):
        if extent / (step * factor) <= 10:
            step *= factor
            break
    return [k * step * unit_s for k in range(int(extent / step) + 1)]


# --- SVG (report.html) ---------------------------------------------------------------------

_W, _LEFT, _PLOT_W, _LANE_PX, _CURVE_PX = 1100, 70, 850, 30, 120


def svg(lay: Layout) -> str:
    """The timeline as one inline <svg> element."""
    e = html.escape
    lanes_top = 36
    lanes_px = max(len(lay.lanes), 1) * _LANE_PX
    curve_top = lanes_top + lanes_px + 34
    height = curve_top + _CURVE_PX + 40

    def x(seconds: float) -> float:
        return _LEFT + seconds / lay.span_s * _PLOT_W

    def y_lane(units: float) -> float:
        return lanes_top + units * _LANE_PX

    def y_util(pct: float) -> float:
        return curve_top + _CURVE_PX * (1 - pct / 105)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}"'
        ' font-family="system-ui,sans-serif" font-size="11" role="img" aria-label="timeline">',
        '<defs><pattern id="hatch-failed" patternUnits="userSpaceOnUse" width="6" height="6">'
        '<path d="M0,0L6,6M6,0L0,6" stroke="#000" stroke-width="0.7"/></pattern>'
        '<pattern id="hatch-interrupted" patternUnits="userSpaceOnUse" width="6" height="6">'
        '<path d="M0,6L6,0" stroke="#000" stroke-width="0.7"/></pattern></defs>',
        f'<text x="{_LEFT}" y="20" font-size="13">{e(lay.title)}</text>',
    ]
    for gap_start, gap_end in lay.gaps:
        for top, px in ((lanes_top, lanes_px), (curve_top, _CURVE_PX)):
            out.append(f'<rect x="{x(gap_start):.1f}" y="{top}" width="{max(x(gap_end) - x(gap_start), 0.5):.1f}"'
                       f' height="{px}" fill="#d9d9d9"/>')
    for i, label in enumerate(lay.lanes):
        out.append(f'<text x="{_LEFT - 6}" y="{y_lane(i + 0.5) + 4:.1f}" text-anchor="end">{e(label)}</text>')
    stroke = ' stroke="#000" stroke-width="0.4"' if len(lay.bars) <= 400 else ""  # edges of thousands of bars are a black smear
    for (phase, hatch), bars in lay.groups().items():
        d = "".join(
            f"M{x(b.x0_s):.1f},{y_lane(b.y):.1f}h{max(x(b.x1_s) - x(b.x0_s), 0.3):.1f}v{b.height * 0.92 * _LANE_PX:.1f}"
            f"h{-max(x(b.x1_s) - x(b.x0_s), 0.3):.1f}z" for b in bars
        )
        out.append(f'<path d="{d}" fill="{lay.colour(phase)}"{stroke}/>')
        if hatch:
            out.append(f'<path d="{d}" fill="url(#hatch-{hatch})"/>')
    for b in lay.labelled():
        width_px = x(b.x1_s) - x(b.x0_s)
        name = b.name if len(b.name) * 6 < width_px else b.name[: max(int(width_px / 6) - 1, 0)] + "…"
        out.append(f'<text x="{x((b.x0_s + b.x1_s) / 2):.1f}" y="{y_lane(b.y + b.height * 0.46) + 3:.1f}"'
                   f' text-anchor="middle" font-size="9">{e(name)}</text>')
    # frames, x axis and its ticks
    out.append(f'<rect x="{_LEFT}" y="{lanes_top}" width="{_PLOT_W}" height="{lanes_px}" fill="none" stroke="#444"/>')
    out.append(f'<rect x="{_LEFT}" y="{curve_top}" width="{_PLOT_W}" height="{_CURVE_PX}" fill="none" stroke="#444"/>')
    for t in _ticks(lay.span_s, lay.unit_s):
        label = f"{t / lay.unit_s:g}"
        for bottom in (lanes_top + lanes_px, curve_top + _CURVE_PX):
            out.append(f'<path d="M{x(t):.1f},{bottom}v4" stroke="#444"/>')
        out.append(f'<text x="{x(t):.1f}" y="{curve_top + _CURVE_PX + 16}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{_LEFT + _PLOT_W / 2}" y="{curve_top + _CURVE_PX + 32}" text-anchor="middle">'
               f"time since start ({lay.unit})</text>")
    for tick in (0, 50, 100):
        out.append(f'<text x="{_LEFT - 6}" y="{y_util(tick) + 4:.1f}" text-anchor="end">{tick}%</text>')
    out.append(f'<path d="M{_LEFT},{y_util(lay.target_pct):.1f}h{_PLOT_W}" stroke="#666" stroke-dasharray="5,4"/>')
    for i, (_label, xs, ys) in enumerate(lay.curves):
        points: list[str] = []
        pen = "M"
        for cx, cy in zip(xs, ys):
            if math.isnan(cy):
                pen = "M"
                continue
            # steps: a reading holds until the next one
            points.append(f"M{x(cx):.1f},{y_util(cy):.1f}" if pen == "M" else f"H{x(cx):.1f}V{y_util(cy):.1f}")
            pen = "H"
        out.append(f'<path d="{"".join(points)}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="1.2"/>')
    # legend: phases and hatches beside the lanes, GPUs beside the curves
    legend_x = _LEFT + _PLOT_W + 16
    entries = [(f'fill="{lay.colour(i)}"', p) for i, p in enumerate(lay.phases)]
    entries += [('fill="url(#hatch-failed)"', "failed"), ('fill="url(#hatch-interrupted)"', "interrupted")]
    if lay.gaps:
        entries.append(('fill="#d9d9d9"', "no allocation"))
    for i, (fill, label) in enumerate(entries):
        top = lanes_top + i * 16
        out.append(f'<rect x="{legend_x}" y="{top}" width="12" height="11" {fill} stroke="#000" stroke-width="0.4"/>'
                   f'<text x="{legend_x + 18}" y="{top + 10}">{e(label)}</text>')
    for i, (label, _xs, _ys) in enumerate(lay.curves):
        top = curve_top + i * 16
        out.append(f'<path d="M{legend_x},{top + 6}h14" stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2"/>'
                   f'<text x="{legend_x + 18}" y="{top + 10}">{e(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


# --- PNG (timeline.png, `gpupack report`) --------------------------------------------------


def png(lay: Layout) -> bytes | None:
    """The timeline as PNG bytes, or None when matplotlib is not installed."""
    try:
        # Figure without pyplot: no global backend switch and no display needed on a compute node.
        from matplotlib.collections import PolyCollection
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return None
    n = max(len(lay.lanes), 1)
    fig = Figure(figsize=(12, 2.5 + 0.7 * n), layout="constrained")
    lanes, curve = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [n * 0.7, 2.0]})
    scale = lay.unit_s
    edges = len(lay.bars) <= 400
    for (phase, hatch), bars in lay.groups().items():
        verts = [
            [(b.x0_s / scale, b.y), (b.x1_s / scale, b.y), (b.x1_s / scale, b.y + b.height * 0.92), (b.x0_s / scale, b.y + b.height * 0.92)]
            for b in bars
        ]
        lanes.add_collection(PolyCollection(
            verts, facecolors=lay.colour(phase), edgecolors="black" if edges or hatch else "none",
            linewidths=0.4 if edges else 0.0, hatch={"failed": "xx", "interrupted": "//"}.get(hatch or ""),
        ))
    for b in lay.labelled():
        lanes.text((b.x0_s + b.x1_s) / 2 / scale, b.y + b.height * 0.46, b.name, ha="center", va="center", fontsize=6, clip_on=True)
    for gap_start, gap_end in lay.gaps:
        for ax in (lanes, curve):
            ax.axvspan(gap_start / scale, gap_end / scale, color="0.85", zorder=0)
    lanes.set_xlim(0, lay.span_s / scale)
    lanes.set_ylim(n, 0)  # the first GPU on top
    lanes.set_yticks([i + 0.5 for i in range(len(lay.lanes))], lay.lanes)
    handles = [Patch(facecolor=lay.colour(i), edgecolor="black", label=p) for i, p in enumerate(lay.phases)]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="xx", label="failed"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="interrupted")]
    if lay.gaps:
        handles.append(Patch(facecolor="0.85", label="no allocation"))
    lanes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    lanes.set_title(lay.title, fontsize=10)
    for i, (label, xs, ys) in enumerate(lay.curves):
        curve.plot([x / scale for x in xs], ys, linewidth=0.9, drawstyle="steps-post", label=label, color=PALETTE[i % len(PALETTE)])
    curve.axhline(lay.target_pct, color="0.4", linestyle="--", linewidth=0.8, label=f"{lay.target_pct:.0f}% target")
    curve.set_ylim(0, 105)
    curve.set_ylabel("utilization %")
    curve.set_xlabel(f"time since start ({lay.unit})")
    if lay.curves:
        curve.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()

