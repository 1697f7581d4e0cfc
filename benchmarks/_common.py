"""Shared helpers for the benchmarks: run `gpupack` as a subprocess, read its state.db, sample a
process's CPU time and memory from /proc."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def gpupack_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpupack", *args]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("SLURM_JOB_ID", None)
    e.update(extra)
    return e


def cpu_seconds(pid: int) -> float | None:
    """The process's own user+system CPU time (children excluded)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_gpupack(manifest: Path, *args: str) -> tuple[float, float | None, int]:
    """Wall seconds, the scheduler's own CPU seconds (sampled until it exits), exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(gpupack_cmd("run", str(manifest), "--no-report", *args), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu = None
    while proc.poll() is None:
        cpu = cpu_seconds(proc.pid) or cpu
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"gpupack run failed ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
    return wall, cpu, proc.returncode


def status(run_dir: Path) -> list[dict[str, object]]:
    out = subprocess.run(gpupack_cmd("status", str(run_dir), "--json"), env=env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["experiments"]


def events(run_dir: Path) -> list[tuple[float, str, str | None]]:
    db = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return list(db.execute("SELECT t, kind, experiment FROM events ORDER BY id"))
    finally:
        db.close()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}"
