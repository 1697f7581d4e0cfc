"""One function per subcommand; cli.py parses arguments and calls these.

Exit codes (README, DESIGN.md): 0 all succeeded, 1 some failed, 2 bad input (or the run
directory is busy / unusable), 3 stopped early (preempted, or the time left was too short).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from . import engine as engine_mod
from . import manifest as manifest_mod
from .gpus import GpuSpecError, node_gpus, open_probe
from .launch import LocalLauncher, SrunLauncher
from .store import RUNNING, Store, StoreError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class GpupackError(Exception):
    """A user-facing error: printed as one line (or one per problem), no traceback."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


@dataclass
class RunArgs:
    manifest: Path
    gpus: str | None = None
    poll_s: float = 5.0
    grace_s: float = 60.0
    log_every_s: float = 60.0
    headroom: str | None = None
    srun_mode: str | None = None
    max_requeues: int = 10
    report: bool = True
    argv: tuple[str, ...] = ()  # the arguments of `run`, for resubmitting the same job


def _load_manifest(path: Path, inventory: Sequence[Any] = ()) -> manifest_mod.Manifest:
    """The manifest; a `nodes: K` experiment without `gpus` takes every GPU of a node of `inventory`."""
    try:
        return manifest_mod.load(path, node_gpus=node_gpus(inventory))
    except manifest_mod.ManifestError as exc:
        raise GpupackError(str(exc)) from None


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One scheduler per run directory: an flock held for the life of the process (released by
    the kernel even on kill -9, so a crash never leaves a stale lock)."""
    path = run_dir / "lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise GpupackError(f"{run_dir}: cannot use the run directory: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise GpupackError(
                f"{run_dir}: another gpupack run is using this run directory ({holder}); "
                "wait for it to end or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run(args: RunArgs, console: Console) -> int:
    from . import slurm  # Slurm facts; harmless outside an allocation

    allocation = slurm.Allocation.from_env(os.environ)
    node = allocation.nodes[0] if allocation and allocation.nodes else socket.gethostname().split(".")[0]
    fallback = f"{allocation.gpus_per_node}x80GB" if allocation and allocation.gpus_per_node else "4x80GB"
    try:
        probe, note = open_probe(args.gpus, node, os.environ, fallback, allocation.nodes if allocation else ())
    except GpuSpecError as exc:
        raise GpupackError(str(exc)) from None
    inventory = probe.inventory()
    manifest = _load_manifest(args.manifest, inventory)
    headroom = 0
    if args.headroom:
        try:
            headroom = manifest_mod.parse_size(args.headroom)
        except ValueError as exc:
            raise GpupackError(f"--headroom: {exc}") from None
    _refuse_unfit(manifest, inventory, headroom)
    try:
        manifest.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GpupackError(f"{manifest.run_dir}: cannot create the run directory: {exc.strerror}") from None
    with run_lock(manifest.run_dir):
        try:
            store = Store(manifest.run_dir / "state.db")
        except StoreError as exc:
            raise GpupackError(str(exc)) from None
        if allocation is not None:
            mode = slurm.detect_gpu_mode(args.srun_mode or os.environ.get("GPUPACK_SRUN_MODE"))
            launcher: LocalLauncher = SrunLauncher(mode, node_gpus=allocation.gpus_per_node or None)
            hooks = slurm.engine_hooks(allocation, args.max_requeues, run_args=args.argv)
        else:
            launcher = LocalLauncher()
            hooks = engine_mod.Hooks()
        options = engine_mod.RunOptions(poll_s=args.poll_s, grace_s=args.grace_s, headroom_bytes=headroom)
        eng = engine_mod.Engine(manifest, store, probe, launcher, inventory, options, hooks)
        from .dashboard import Dashboard

        store.set_meta({"log_every": str(args.log_every_s)})
        board = Dashboard(store, manifest.run_dir, console, live=console.is_terminal, log_every_s=args.log_every_s)
        eng.on_tick = board.refresh
        eng.signals.install()
        code = EXIT_FAILED
        try:
            eng.prepare()
            if note:
                store.event("warn", None, note)
            board.start()
            code = eng.run()
        except StoreError as exc:
            left = f", {len(eng.running)} experiment(s) left running" if eng.running else ""
            raise GpupackError(
                f"{exc}; gpupack stopped{left}: free the space or the lock, then `gpupack run` "
                "again, it picks up where this one stopped"
            ) from None
        finally:
            board.stop()
            eng.close(code)
        if args.report:
            _write_report(manifest.run_dir, console)
        store.close()
        return code


def _write_report(run_dir: Path, console: Console) -> None:
    try:
        from .report import write_report

        paths = write_report(run_dir)
        if "html" in paths:
            console.print(f"report: {paths['html']}", highlight=False)
    except Exception as exc:  # a report is a convenience; never let it turn a good run into a failure
        console.print(f"warning: could not write the report: {exc}", highlight=False)


def _refuse_unfit(manifest: manifest_mod.Manifest, inventory: Sequence[Any], headroom: int) -> None:
    from . import policy

    snaps = [policy.GpuSnapshot(g.node, g.index, g.total_bytes, None) for g in inventory]
    problems = []
    reasons: dict[tuple[int, int | None, int, int], str | None] = {}  # a 10,000-run grid has a few shapes
    for exp in manifest.experiments:
        shape = (exp.gpus, exp.mem_bytes, exp.cpus, exp.nodes)  # all that unfit_reason looks at
        if shape not in reasons:
            reasons[shape] = policy.unfit_reason(engine_mod.request_for(exp, exp.mem_bytes), snaps, headroom)
        why = reasons[shape]
        if why:
            field = "nodes" if "whole nodes of" in why else "gpus" if "GPU" in why and "memory" not in why else "mem"
            problems.append(f"{manifest.path}: {exp.name}: {field}: {why}")
    if problems:
        raise GpupackError("\n".join(problems))


def plan(
    manifest_path: Path, gpus: str | None, time_limit: str | None, as_json: bool, out: IO[str], console: Console
) -> int:
    """Predict the run's timeline with the run's own policy; nothing is launched."""
    from .gpus import parse_gpu_spec
    from .simulate import plan_data, render_plan

    spec = gpus or os.environ.get("GPUPACK_GPUS") or "4x80GB"
    try:
        inventory = parse_gpu_spec(spec, "node")
        limit = manifest_mod.parse_duration(time_limit) if time_limit else None
    except (GpuSpecError, ValueError) as exc:
        raise GpupackError(str(exc) if isinstance(exc, GpuSpecError) else f"--time: {exc}") from None
    manifest = _load_manifest(manifest_path, inventory)
    _refuse_unfit(manifest, inventory, 0)
    data = plan_data(manifest, inventory, limit)
    if as_json:
        json.dump(data, out, indent=1)
        out.write("\n")
    else:
        render_plan(data, console)
    return EXIT_OK


def _open_store(run_dir: Path) -> Store:
    db = run_dir / "state.db"
    if not db.is_file():
        raise GpupackError(f"{run_dir}: not a gpupack run directory (no state.db)")
    try:
        return Store(db, readonly=True)
    except StoreError as exc:
        raise GpupackError(str(exc)) from None


def status(run_dir: Path, as_json: bool, out: IO[str], console: Console) -> int:
    from .status import status_data

    store = _open_store(run_dir)
    data = status_data(store, store.meta().get("run_name", run_dir.name))
    if as_json:
        json.dump(data, out, indent=1)
        out.write("\n")
        return EXIT_OK
    from .dashboard import status_table

    console.print(status_table(data))
    return EXIT_OK


def reset(run_dir: Path, patterns: Sequence[str], console: Console) -> int:
    _open_store(run_dir).close()
    with run_lock(run_dir):
        store = Store(run_dir / "state.db")
        names = [r.name for r in store.experiments()]
        chosen = [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if patterns and not chosen:
            raise GpupackError(f"{run_dir}: no experiment matches {' '.join(patterns)}")
        running = [r.name for r in store.experiments() if r.state == RUNNING and r.name in chosen]
        count = store.reset(chosen)
        console.print(f"reset {count} experiment(s); they run again on the next `gpupack run`", highlight=False)
        if running:
            console.print(f"left {len(running)} recorded as running; the next run checks on them", highlight=False)
        store.close()
    return EXIT_OK


def watch(run_dir: Path, interval_s: float, console: Console) -> int:
    from .dashboard import watch as watch_view

    _open_store(run_dir).close()
    return watch_view(run_dir, console, interval_s)


def report(run_dir: Path, console: Console) -> int:
    _open_store(run_dir).close()
    from .report import write_report

    for kind, path in write_report(run_dir).items():
        console.print(f"{kind}: {path}", highlight=False)
    return EXIT_OK


def results(run_dir: Path, by: Sequence[str] | None, fmt: str, out: IO[str]) -> int:
    _open_store(run_dir).close()
    from . import results as results_mod

    problems: list[str] = []
    rows = results_mod.collect(run_dir, problems)
    for line in problems:
        print(f"gpupack: warning: {line}", file=sys.stderr)
    try:
        table = results_mod.aggregate(rows, list(by) if by else None)
    except ValueError as exc:
        raise GpupackError(str(exc)) from None
    out.write(results_mod.render(table, fmt))
    return EXIT_OK

