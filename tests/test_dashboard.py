"""The dashboard on a run written through Store: job-log lines in a real file, the live view, status, watch."""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from gpupack import dashboard, reader
from gpupack.status import status_data
from gpupack.store import A_RUNNING, Store
from conftest import ROOT, gpupack_env
from test_report import NOW, T0, make_run  # the shared fixture run (tests/ is on sys.path)

EVENT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+ +\S")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "demo")


def test_job_log_is_plain_lines_and_snapshots(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "slurm-4242.out"
    writer = Store(run_dir / "state.db")
    reader = Store(run_dir / "state.db", readonly=True)
    with log.open("w") as f:
        board = dashboard.Dashboard(reader, run_dir, Console(file=f, force_terminal=False), live=False, log_every_s=60)
        board.start(NOW)  # the 15 events so far, then a snapshot
        long = "probe-l2 " + "x" * 300
        writer.event("info", "probe-l2", long, NOW + 5)
        board.refresh(NOW + 10)  # one new event line, no snapshot: 10 s < log_every
        assert log.read_text().count("\n") > 15  # each line is flushed as it is written, before stop()
        board.refresh(NOW + 59)
        board.refresh(NOW + 60)  # log_every reached: a snapshot
        board.stop(NOW + 61)  # and the final one
    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text  # no colours, no cursor movement
    lines = text.splitlines()
    events = [line for line in lines if EVENT_LINE.match(line)]
    assert len(events) == 16
    assert [line for line in lines if long in line] == [events[-1]]  # a long event stays one line
    assert events[0].endswith("start     bridge-sst2-s1 started on gpu0 (attempt 1)")
    headers = [line for line in lines if line.startswith("=== ")]
    assert len(headers) == 3
    assert "| demo | job 4242 | elapsed 25m00s | left 1h35m | ETA ~18m20s ===" in headers[0]
    assert "elapsed 26m00s" in headers[1]
    first = lines[lines.index(headers[0]):]
    gpu1 = next(line for line in first if line.startswith("gpu1 "))
    assert gpu1 == "gpu1 |  90% #########. | ####...... 30.0/80.0 GB | probe-l1 (10.0 GB/20.0 GB)"
    assert next(line for line in first if line.startswith("seeds ")) == (
        "seeds   | #################... |  5/6 |       0 |      0 |       1"
    )
    writer.close()


def test_a_new_run_shows_only_its_own_events_and_readings(run_dir: Path) -> None:
    writer = Store(run_dir / "state.db")
    writer.begin_run(1, "h", "4243", "n1:0:1,n1:1:1", T0 + 9000)
    writer.event("info", None, "requeued: skipping 5 succeeded experiments", T0 + 9001)
    buf = io.StringIO()
    board = dashboard.Dashboard(writer, run_dir, Console(file=buf, force_terminal=False), live=False)
    board.start(T0 + 9002)
    events = [line for line in buf.getvalue().splitlines() if EVENT_LINE.match(line)]
    assert len(events) == 1 and events[0].endswith("requeued: skipping 5 succeeded experiments")
    # the last reading is from the earlier allocation: unknown now, not 90 %
    assert [line for line in buf.getvalue().splitlines() if line.startswith("gpu1 ")] == [
        "gpu1 |   ?            |            ?/80.0 GB | probe-l1 (10.0 GB/20.0 GB)"
    ]
    writer.close()


def test_eta_spreads_work_left_over_gpus(run_dir: Path) -> None:
    view = dashboard.build_view(Store(run_dir / "state.db", readonly=True), NOW)
    # left: bridge-trec-s3 600 s (20 GB of 80 -> util 1 wins), probe-l1 900 - 200 s running,
    # probe-l2 900 s: 2200 GPU-seconds over 2 GPUs = 1100 s, more than the longest (900 s).
    assert view.eta_s == pytest.approx(1100) and view.unestimated == 0
    assert [(p.name, p.done, p.total) for p in view.phases] == [("seeds", 5, 6), ("probes", 0, 2), ("latency", 1, 1)]


def test_eta_learns_from_grid_siblings_when_time_is_unknown(run_dir: Path) -> None:
    store = Store(run_dir / "state.db", readonly=True)
    running = store.attempts(states=[A_RUNNING])
    unestimated = [replace(e, spec={**e.spec, "time_s": None}) if e.name == "bridge-trec-s3" else e for e in store.experiments()]
    # bridge-trec-s3 borrows the mean of its siblings' successes, (600+600+700+550+600)/5 = 610 s;
    # with probe-l1's 700 s left and probe-l2's 900 s: 2210 / 2 GPUs = 1105 s
    assert dashboard.estimate_eta(store, unestimated, running, 2, 80 * 10**9, NOW) == (pytest.approx(1105), 0)
    lonely = [replace(e, template="solo") if e.spec["time_s"] is None else e for e in unestimated]
    # without siblings it is left out and counted: (700 + 900) / 2 = 800 s < the longest, 900 s
    assert dashboard.estimate_eta(store, lonely, running, 2, 80 * 10**9, NOW) == (pytest.approx(900), 1)


def test_live_view_renders(run_dir: Path) -> None:
    console = Console(record=True, width=120)
    console.print(dashboard.live_renderable(dashboard.build_view(Store(run_dir / "state.db", readonly=True), NOW)))
    text = console.export_text()
    assert "demo | job 4242 | elapsed 25m00s | left 1h35m | ETA ~18m20s" in text
    assert re.search(r"gpu1 +90% +█+░ +█+░+ 30.0/80.0 GB +probe-l1 \(10.0 GB/20.0 GB\)", text), text
    assert re.search(r"seeds +█+░+ +5/6", text)
    assert "probe-l1 started on gpu1 (attempt 1)" in text  # recent events


def test_live_dashboard_draws_in_place(run_dir: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system="standard")
    board = dashboard.Dashboard(Store(run_dir / "state.db", readonly=True), run_dir, console, live=True)
    board.start(NOW)
    board.refresh(NOW + 1)
    board.stop(NOW + 2)
    out = buf.getvalue()
    assert "\x1b[" in out and "probe-l1" in out
    assert "\x1b[2K" in out or "\x1b[1A" in out  # Live rewrote its frame instead of appending


def test_status_table(run_dir: Path) -> None:
    data = status_data(Store(run_dir / "state.db", readonly=True), "demo")
    text = dashboard.status_table(data, now=NOW)
    assert re.search(r"bridge-trec-s2 +seeds +succeeded +2 +gpu0 .* 9m10s +0", text)
    assert re.search(r"probe-l1 +probes +running +1 +gpu1 .* 3m20s", text)
    assert re.search(r"lat-b8 .* failed .* 1 +exit code 1", text)
    assert "succeeded 5 failed 1 running 1 pending 2" in text
    assert "\x1b[" not in text  # no console, no colours
    coloured = dashboard.status_table(data, now=NOW, console=Console(force_terminal=True, color_system="standard"))
    assert "\x1b[1;31mfailed\x1b[0m" in coloured and re.sub(r"\x1b\[[0-9;]*m", "", coloured) == text


def test_watch_returns_when_the_run_has_ended(run_dir: Path) -> None:
    writer = Store(run_dir / "state.db")
    writer.end_run(1, 0, NOW)
    buf = io.StringIO()
    assert reader.watch(run_dir, Console(file=buf, force_terminal=False), interval_s=0.01) == 0
    out = buf.getvalue()
    assert out.count("=== ") == 2 and out.rstrip().endswith("run ended (exit code 0)")
    assert "| demo | job 4242 | ended after 25m00s ===" in out
    writer.close()


def test_watch_notices_a_dead_scheduler(run_dir: Path) -> None:
    proc = subprocess.Popen(["true"])  # a pid that has exited and been reaped
    proc.wait()
    writer = Store(run_dir / "state.db")
    writer.begin_run(proc.pid, socket.gethostname(), None, "", NOW + 100)
    buf = io.StringIO()
    assert reader.watch(run_dir, Console(file=buf, force_terminal=False), interval_s=0.01) == 0
    assert f"the scheduler (pid {proc.pid}) is gone" in buf.getvalue()
    writer.close()


def test_gpupack_run_writes_a_plain_job_log(write_manifest: Callable[[str], Path], tmp_path: Path) -> None:
    """The real CLI with stdout to a file, as under sbatch: event lines, snapshots, then the report."""
    manifest = write_manifest(
        """
        name: joblog
        phases:
          - name: only
            experiments:
              - name: "e{i}"
                cmd: "echo hi"
                grid: {i: [1, 2]}
                mem: 1GB
        """
    )
    log = tmp_path / "slurm-1.out"
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "gpupack", "run", str(manifest), "--gpus", "1x80GB", "--poll", "0.2"],
            stdout=f, stderr=subprocess.STDOUT, env=gpupack_env(), cwd=ROOT, timeout=120,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\x1b" not in text
    lines = text.splitlines()
    for name in ("e1", "e2"):
        assert len([line for line in lines if EVENT_LINE.match(line) and f" {name} started on gpu0" in line]) == 1
        assert len([line for line in lines if EVENT_LINE.match(line) and f" {name} succeeded" in line]) == 1
    headers = [line for line in lines if line.startswith("=== ")]
    assert len(headers) == 2 and "| joblog |" in headers[0]  # the first and the final snapshot
    assert lines[lines.index(headers[1]) + 3].startswith("only  | #################### |  2/2 |")
    assert (tmp_path / "runs" / "joblog" / "report" / "report.html").is_file()


@pytest.mark.parametrize("args", [["--help"], ["status", "RUN"], ["status", "RUN", "--json"], ["results", "RUN"]])
def test_commands_that_draw_nothing_import_neither_rich_nor_matplotlib(run_dir: Path, args: list[str]) -> None:
    """Start-up cost: `--help`, piped `status` (plain text), `status --json` and `results` draw nothing."""
    script = (
        "import sys\nfrom gpupack import cli\ntry:\n    code = cli.main(sys.argv[1:])\nexcept SystemExit as exc:\n"
        "    code = exc.code\nloaded = sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'matplotlib'})\n"
        "print('LOADED', loaded, code, file=sys.stderr)\n"
    )
    argv = [str(run_dir) if a == "RUN" else a for a in args]
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, env=gpupack_env(),
                          cwd=ROOT, timeout=60)
    assert "LOADED [] 0" in done.stderr, done.stderr[-2000:]
