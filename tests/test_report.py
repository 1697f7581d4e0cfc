"""report.py on a run directory written for real through Store (no engine), and the HTML in headless Chromium.

`make_run` is the shared fixture run of the dashboard, report and results tests: two 80 GB GPUs
on node n1, 25 minutes in, with co-located, failed, retried, running and pending experiments.
"""

from __future__ import annotations

import json
import sys
import math
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from gpupack import report, timeline
from gpupack.store import (
    A_FAILED, A_SUCCEEDED, FAILED, PENDING, SUCCEEDED, ExperimentRow, Store,
)

T0 = 1_700_000_000.0
NOW = T0 + 1500  # the last GPU sample
GB = 10**9


def _row(name: str, phase: str, template: str, ord: int, params: dict[str, object], mem_gb: int, time_s: float) -> ExperimentRow:
    spec = {"gpus": 1, "mem_bytes": mem_gb * GB, "time_s": time_s, "exclusive": False, "resumable": False, "util": 1.0, "cpus": 1}
    return ExperimentRow(name, phase, template, ord, f"fp-{name}", PENDING, None, spec, params, True)


def _attempt(store: Store, name: str, gpu: int, start: float, end: float | None, code: int = 0, peak_gb: float = 10) -> None:
    """One attempt on gpu `gpu`; end None leaves it running."""
    number = store.next_attempt_number(name)
    aid = store.begin_attempt(name, number, 1, "n1", [gpu], f"exp/{name}/attempt-{number}.log", 20 * GB, T0 + start)
    store.attempt_launched(aid, 1000 + aid)
    store.event("start", name, f"{name} started on gpu{gpu} (attempt {number})", T0 + start)
    store.record_usage({aid: (int(peak_gb * GB), 90.0)})
    if end is None:
        return
    ok = code == 0
    store.end_attempt(aid, A_SUCCEEDED if ok else A_FAILED, code, T0 + end, SUCCEEDED if ok else FAILED,
                      None if ok else f"exit code {code}")
    store.event("finish" if ok else "fail", name, f"{name} {'succeeded' if ok else f'failed (exit {code})'} on gpu{gpu}", T0 + end)


_TEMPLATE = tempfile.TemporaryDirectory(prefix="gpupack-test-run-")  # removed when the session ends


def make_run(run_dir: Path) -> Path:
    """A fresh copy of the fixture run at run_dir. It is built once: its ~60 transactions, each
    fsynced (synchronous=FULL), take half a second on a disk, a copy a few milliseconds."""
    template = Path(_TEMPLATE.name) / "demo"
    if not template.exists():
        _build_run(template)
    shutil.copytree(template, run_dir)
    return run_dir


def _build_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    store = Store(run_dir / "state.db")
    rows = [
        _row(f"bridge-{task}-s{seed}", "seeds", "bridge-{task}-s{seed}", i * 3 + j, {"task": task, "seed": seed}, 20, 600)
        for i, task in enumerate(["sst2", "trec"]) for j, seed in enumerate([1, 2, 3])
    ]
    rows += [
        _row(f"probe-l{layer}", "probes", "probe-l{layer}", 10 + layer, {"layer": layer}, 30, 900) for layer in (1, 2)
    ]
    rows.append(_row("lat-b8", "latency", "lat-b8", 20, {}, 10, 60))
    store.sync_experiments(rows)
    inventory = [{"node": "n1", "index": i, "total_bytes": 80 * GB, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i}"} for i in (0, 1)]
    store.set_meta({"run_name": "demo", "manifest": "/x/demo.yaml", "job_id": "4242", "alloc_end": str(T0 + 7200),
                    "gpus": json.dumps(inventory), "log_every": "60"})
    store.begin_run(4_000_000, "elsewhere", "4242", f"n1:0:{80 * GB},n1:1:{80 * GB}", T0)
    # gpu0: sst2-s1 and sst2-s2 side by side 0-600, trec-s2 fails 600-650 and succeeds 650-1200,
    # lat-b8 fails 1200-1250, idle after: busy 1250 of 1500 s.
    # gpu1: sst2-s3 0-700, trec-s1 700-1300, probe-l1 running since 1300: busy 1500 of 1500 s.
    _attempt(store, "bridge-sst2-s1", 0, 0, 600)
    _attempt(store, "bridge-sst2-s2", 0, 0, 600)
    _attempt(store, "bridge-sst2-s3", 1, 0, 700, peak_gb=25)  # above its declared 20 GB
    _attempt(store, "bridge-trec-s2", 0, 600, 650, code=1)
    _attempt(store, "bridge-trec-s2", 0, 650, 1200)
    _attempt(store, "bridge-trec-s1", 1, 700, 1300)
    _attempt(store, "lat-b8", 0, 1200, 1250, code=1)
    _attempt(store, "probe-l1", 1, 1300, None)
    busy = {0: [(0, 1250)], 1: [(0, 1501)]}
    for k in range(26):
        t = k * 60
        store.add_gpu_samples(T0 + t, [
            ("n1", g, 90.0 if any(a <= t < b for a, b in busy[g]) else 0.0, 30 * GB if g else 20 * GB, 80 * GB) for g in (0, 1)
        ])
    store.close()
    accuracy = {("sst2", 1): 0.80, ("sst2", 2): 0.84, ("sst2", 3): 0.88, ("trec", 1): 0.70, ("trec", 2): 0.72}
    for (task, seed), acc in accuracy.items():
        out = run_dir / "exp" / f"bridge-{task}-s{seed}"
        out.mkdir(parents=True, exist_ok=True)
        results = {"accuracy": acc, "loss": {"final": 1 - acc}, "seed": seed, "config": {"lr": 1e-3, "task": task}}
        (out / "results.json").write_text(json.dumps(results))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "demo")


def _summary(run_dir: Path) -> dict[str, Any]:
    """summary.json's content without drawing the timeline (matplotlib takes seconds to import)."""
    store = Store(run_dir / "state.db", readonly=True)
    try:
        return report.summarize(report.load_facts(store))
    finally:
        store.close()


def test_union_seconds_counts_overlap_once() -> None:
    assert report.union_seconds([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    assert report.union_seconds([]) == 0


def test_summary_busy_fraction_per_gpu_and_overall(run_dir: Path) -> None:
    summary: dict[str, Any] = _summary(run_dir)
    gpus = {g["gpu"]: g for g in summary["gpus"]}
    # The run never recorded its end: it lasts until its last sign of life, the sample at 1500 s.
    assert summary["wall_s"] == pytest.approx(1500)
    assert gpus["gpu0"]["busy_s"] == pytest.approx(1250)
    assert gpus["gpu0"]["busy_fraction"] == pytest.approx(1250 / 1500)
    assert gpus["gpu1"]["busy_fraction"] == pytest.approx(1.0)  # the running probe counts to the end
    assert summary["overall"]["busy_fraction"] == pytest.approx(2750 / 3000)
    assert summary["target"] == {"busy_fraction": 0.8, "met": True}
    # gpu0: 21 samples at 90 %, 5 at 0 % (1260..1500 s)
    assert gpus["gpu0"]["mean_util_pct"] == pytest.approx(90 * 21 / 26)
    assert gpus["gpu1"]["name"] == "NVIDIA H100 80GB HBM3"
    assert summary["counts"] == {"pending": 2, "running": 1, "succeeded": 5, "failed": 1, "interrupted": 0, "skipped": 0}


def test_summary_per_experiment(run_dir: Path) -> None:
    summary: dict[str, Any] = _summary(run_dir)
    exps = {e["name"]: e for e in summary["experiments"]}
    retried = exps["bridge-trec-s2"]
    assert (retried["state"], retried["attempts"], retried["gpus"]) == ("succeeded", 2, ["gpu0"])
    assert retried["duration_s"] == pytest.approx(550) and retried["total_s"] == pytest.approx(600)
    assert [a["exit_code"] for a in retried["attempt_list"]] == [1, 0]
    assert exps["bridge-sst2-s3"]["peak_bytes"] == 25 * GB and exps["bridge-sst2-s3"]["mem_bytes"] == 20 * GB
    assert exps["probe-l1"]["state"] == "running" and exps["probe-l1"]["duration_s"] == pytest.approx(200)
    assert exps["probe-l2"]["attempts"] == 0 and exps["probe-l2"]["duration_s"] is None
    assert exps["lat-b8"]["reason"] == "exit code 1"
    assert [p["phase"] for p in summary["phases"]] == ["seeds", "probes", "latency"]


def test_later_run_on_other_gpus_counts_only_its_own_time(run_dir: Path) -> None:
    """A resubmission landed on node n2: n1's GPUs are judged on the first allocation only."""
    store = Store(run_dir / "state.db")
    rid = store.begin_run(1, "h", "4243", f"n2:0:{80 * GB}", T0 + 5000)
    aid = store.begin_attempt("bridge-trec-s3", 1, rid, "n2", [0], "x.log", None, T0 + 5000)
    store.end_attempt(aid, A_SUCCEEDED, 0, T0 + 5400, SUCCEEDED)
    store.end_run(rid, 0, T0 + 5500)
    store.close()
    summary: dict[str, Any] = _summary(run_dir)
    gpus = {g["gpu"]: g for g in summary["gpus"]}
    assert summary["wall_s"] == pytest.approx(1500 + 500)
    assert gpus["n2:gpu0"]["busy_fraction"] == pytest.approx(400 / 500)
    assert gpus["n1:gpu0"]["busy_fraction"] == pytest.approx(1250 / 1500)
    assert summary["overall"]["busy_fraction"] == pytest.approx((1250 + 1500 + 400) / (1500 * 2 + 500))


def test_utilization_steps_hold_to_the_allocation_end_and_break_between_allocations() -> None:
    windows = [report.Window(0, 100, None), report.Window(500, 600, None)]
    xs, ys = timeline.util_steps([(0, 10.0), (50, 90.0), (510, 40.0)], windows)
    assert xs == [0, 50, 100, 100, 510, 600, 600]
    assert ys[:3] == [10.0, 90.0, 90.0] and math.isnan(ys[3]) and ys[4:6] == [40.0, 40.0] and math.isnan(ys[6])


def test_report_files_parse_and_html_is_self_contained(run_dir: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = report.write_report(run_dir)
    assert set(paths) == {"summary", "timeline", "html"}
    png = paths["timeline"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    page = paths["html"].read_text()
    assert "<svg" in page and "</svg>" in page
    assert "src=\"http" not in page and "href=\"http" not in page  # opens offline
    assert "bridge-trec-s2" in page and "92%" in page  # overall busy fraction 2750/3000
    assert "seeds: <span class=\"s-succeeded\">succeeded</span> (5)" in page  # experiments grouped, counted
    assert not [p for p in paths["html"].parent.iterdir() if p.name.startswith(".")]  # no temp file left
    assert json.loads(paths["summary"].read_text())["experiments"][0]["name"] == "bridge-sst2-s1"


class _ImportRecorder:
    """A sys.meta_path finder that notes every attempt to import matplotlib and finds nothing."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "matplotlib":
            self.names.append(name)
        return None


def _forget_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unload matplotlib for this test (restored after), so that an import of it goes to the finders."""
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)


def test_without_png_the_report_has_its_svg_timeline_and_no_stale_png(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of `gpupack run` writes no PNG and does not even import matplotlib; an older PNG
    is removed."""
    (run_dir / "report").mkdir()
    (run_dir / "report" / "timeline.png").write_bytes(b"old")
    _forget_matplotlib(monkeypatch)
    recorder = _ImportRecorder()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    paths = report.write_report(run_dir, png=False)
    assert recorder.names == []
    assert "timeline" not in paths and not (run_dir / "report" / "timeline.png").exists()
    assert "<svg" in paths["html"].read_text()
    assert json.loads(paths["summary"].read_text())["timeline_png"] is None


def test_without_matplotlib_installed_the_report_still_has_everything_but_the_png(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpupack report` where the [report] extra is missing: matplotlib hidden, not stubbed."""
    (run_dir / "report").mkdir()
    (run_dir / "report" / "timeline.png").write_bytes(b"old")
    _forget_matplotlib(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    paths = report.write_report(run_dir, png=True)
    assert set(paths) == {"summary", "html"} and not (run_dir / "report" / "timeline.png").exists()
    assert "<svg" in paths["html"].read_text()
    assert json.loads(paths["summary"].read_text())["timeline_png"] is None


def test_timeline_draws_one_path_per_phase_and_state_not_per_attempt(run_dir: Path) -> None:
    store = Store(run_dir / "state.db", readonly=True)
    try:
        facts = report.load_facts(store)
    finally:
        store.close()
    lay = timeline.layout(facts, "t", 80)
    assert len(lay.bars) == 8  # every attempt is a bar
    # (seeds, -), (seeds, failed), (probes, -), (latency, failed): four groups, one path each, plus
    # one hatch overlay per failed group; 8 attempts or 8,000 draw the same number of paths.
    assert set(lay.groups()) == {(0, None), (0, "failed"), (1, None), (2, "failed")}
    svg = timeline.svg(lay)
    assert svg.count('z" fill="') == 4 + 2  # bar paths end their last rectangle with z
    # gpu0 has two co-located attempts at 0-600 s: two sub-rows, each half the lane
    gpu0 = sorted((b.y, b.height) for b in lay.bars if b.name.startswith("bridge-sst2-s") and b.y < 1)
    assert gpu0 == [(pytest.approx(0.1), pytest.approx(0.4)), (pytest.approx(0.5), pytest.approx(0.4))]


def test_sub_rows_reuse_the_lowest_free_row() -> None:
    rows, count = timeline._sub_rows([(0, 10, "a"), (0, 5, "b"), (5, 8, "c"), (9, 12, "d"), (10, 11, "e")])
    assert (rows, count) == ([0, 1, 1, 1, 0], 2)


def test_html_of_a_large_run_groups_and_pages_experiments() -> None:
    def exp(i: int, state: str) -> dict[str, Any]:
        return {"name": f"t{i}", "phase": "p", "state": state, "reason": None, "attempts": 1, "gpus": ["gpu0"],
                "duration_s": 1.0, "time_s": 1.0, "mem_bytes": GB, "peak_bytes": None, "mean_util_pct": None,
                "attempt_list": [{"exit_code": 0 if state == "succeeded" else 1}]}

    groups = report._experiment_groups([exp(i, "succeeded") for i in range(10_000)] + [exp(10_000 + i, "failed") for i in range(3)])
    assert len(groups) == 2
    assert groups[0].startswith("<details open><summary>p: <span class=\"s-failed\">failed</span> (3)")  # what went wrong first
    assert groups[1].startswith("<details><summary>p: <span class=\"s-succeeded\">succeeded</span> (10000)")
    assert groups[1].count("<tr>") == 1 + report.GROUP_ROWS_MAX and "9500 more in summary.json" in groups[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _png_pixels(data: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct RGB(A) pixels of a non-interlaced 8-bit PNG (what Chromium
    writes), decoded with zlib alone so the test needs nothing but the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    bpp = {2: 3, 6: 4}[header[9]]
    raw, stride, colours = zlib.decompress(idat), width * bpp, set()
    prev = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1): (y + 1) * (stride + 1)]
        kind, cur = line[0], bytearray(line[1:])
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                cur[i] = (cur[i] + a) & 255
            elif kind == 2:
                cur[i] = (cur[i] + b) & 255
            elif kind == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 8 == 0:  # a sample of rows is plenty to tell a page from a blank one
            colours.update(bytes(cur[i:i + 3]) for i in range(0, stride, bpp * 4))
        prev = cur
    return width, height, colours


def test_html_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("GPUPACK_REQUIRE_CHROMIUM") == "1":
            pytest.fail("GPUPACK_REQUIRE_CHROMIUM=1 but no chromium on PATH")
        pytest.skip("chromium not installed (apt-get install chromium)")
    pytest.importorskip("matplotlib")
    page = report.write_report(run_dir)["html"]
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), done.stderr[-2000:]
    width, height, colours = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 1600)
    # A blank or error page has a handful of colours; text, tables and the embedded plot have hundreds.
    assert len(colours) > 50, len(colours)
