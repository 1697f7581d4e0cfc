"""One function per subcommand; cli.py parses arguments and calls these.

Exit codes (README, DESIGN.md): 0 all succeeded, 1 some failed, 2 bad input (or the run
directory is busy / unusable), 3 stopped early (preempted, or the time left was too short).
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .store import RUNNING, Store, StoreError

if TYPE_CHECKING:  # imported where used: `--help`, `status --json` and `results` need none of these
    from rich.console import Console

    from . import manifest as manifest_mod
    from .pool import PoolProbe
    from .slurm_nodes import NodeWatch

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
    state_dir: Path | None = None  # the live database on node-local disk (statedir.py)
    argv: tuple[str, ...] = ()  # the arguments of `run`, for resubmitting the same job


def new_console() -> Console:
    """rich is imported only by the commands that draw with it."""
    from rich.console import Console

    return Console(highlight=False)


def _load_manifest(path: Path, inventory: Sequence[Any] = ()) -> manifest_mod.Manifest:
    """The manifest; a `nodes: K` experiment without `gpus` takes every GPU of a node of `inventory`."""
    from . import manifest as manifest_mod
    from .gpus import node_gpus

    try:
        return manifest_mod.load(path, node_gpus=node_gpus(inventory))
    except manifest_mod.ManifestError as exc:
        raise GpupackError(str(exc)) from None


@contextmanager
def run_lock(run_dir: Path, job_id: str | None = None) -> Iterator[None]:
    """One scheduler per run directory (runlock.py: flock, or an O_EXCL lock file where the file
    system refuses flock)."""
    from .runlock import LockError, run_lock as lock

    with ExitStack() as stack:
        try:
            stack.enter_context(lock(run_dir, job_id))
        except LockError as exc:
            raise GpupackError(str(exc)) from None
        yield


def run(args: RunArgs, console: Console) -> int:
    from . import engine as engine_mod
    from . import manifest as manifest_mod
    from . import slurm  # Slurm facts; harmless outside an allocation
    from .gpus import GpuSpecError, NvmlError, open_probe
    from .launch import LocalLauncher
    from .srun import SrunLauncher

    manifest = _load_manifest(args.manifest)
    allocation = slurm.Allocation.from_env(os.environ)
    node = socket.gethostname().split(".")[0]
    if allocation and allocation.nodes:
        node = allocation.batch_node or allocation.nodes[0]
    fallback = f"{allocation.gpus_per_node}x80GB" if allocation and allocation.gpus_per_node else "4x80GB"
    try:
        probe, note = open_probe(
            args.gpus, node, os.environ, fallback, allocation_gpus=allocation.gpus_per_node if allocation else 0,
            names=allocation.nodes if allocation else (),
        )
    except (GpuSpecError, NvmlError) as exc:
        raise GpupackError(str(exc)) from None
    pool: PoolProbe | None = None
    watch: NodeWatch | None = None
    notes = [note] if note else []
    if allocation is not None and len(allocation.nodes) > 1:
        from .pool import for_allocation  # every other node's GPUs through a reader step

        # The other nodes simulate GPUs too where this one does (--gpus, or no GPU found here).
        spec = args.gpus or os.environ.get("GPUPACK_GPUS") or (fallback if note else None)
        pool, watch, left_out = for_allocation(probe, allocation, str(manifest.run_dir), spec, args.poll_s, os.environ)
        probe = pool
        notes += left_out
    inventory = probe.inventory()
    if any(e.nodes > 1 for e in manifest.experiments):  # whole nodes: `gpus` is a node's count
        manifest = _load_manifest(args.manifest, inventory)
    headroom = 0
    if args.headroom:
        try:
            headroom = manifest_mod.parse_size(args.headroom)
        except ValueError as exc:
            raise GpupackError(f"--headroom: {exc}") from None
    _refuse_unfit(manifest, inventory, headroom)
    _refuse_bad_preempt_signal()
    try:
        manifest.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GpupackError(f"{manifest.run_dir}: cannot create the run directory: {exc.strerror}") from None
    with run_lock(manifest.run_dir, allocation.job_id if allocation else None):
        db_path = manifest.run_dir / "state.db"
        if args.state_dir is not None:
            from . import statedir

            try:
                db_path = statedir.prepare(args.state_dir, manifest.run_dir)
            except statedir.StateDirError as exc:
                raise GpupackError(str(exc)) from None
        try:
            store = Store(db_path)
        except StoreError as exc:
            raise GpupackError(str(exc)) from None
        if allocation is not None:
            mode = slurm.detect_gpu_mode(args.srun_mode or os.environ.get("GPUPACK_SRUN_MODE"))
            lost = None if watch is None else (lambda force: watch.lost(time.time(), force))
            node_gpus = {n: len(allocation.gpus_on(n)) for n in allocation.nodes}
            launcher: LocalLauncher = SrunLauncher(
                mode, node_gpus=node_gpus, here=os.environ.get("SLURMD_NODENAME"), lost_nodes=lost
            )
            hooks = slurm.engine_hooks(allocation, args.max_requeues, run_args=args.argv)
        else:
            launcher = LocalLauncher()
            hooks = engine_mod.Hooks()
        options = engine_mod.RunOptions(poll_s=args.poll_s, grace_s=args.grace_s, headroom_bytes=headroom)
        eng = engine_mod.Engine(manifest, store, probe, launcher, inventory, options, hooks)
        from .dashboard import Dashboard

        from .publish import Publisher

        store.set_meta({"log_every": str(args.log_every_s)})
        board = Dashboard(store, manifest.run_dir, console, live=console.is_terminal, log_every_s=args.log_every_s)
        publisher = Publisher(manifest.run_dir, store, args.poll_s, hooks.job_id, args.log_every_s, args.state_dir)

        def on_tick(now: float) -> None:
            board.refresh(now)
            publisher.tick(now)

        eng.on_tick = on_tick
        eng.signals.install()
        code = EXIT_FAILED
        try:
            # Before prepare: readers on other hosts must see this scheduler's heartbeat (and keep
            # off its WAL database) from its first moment, not an earlier run's end.
            publisher.start()
            eng.prepare()
            for line in notes:
                store.event("warn", None, line)
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
            publisher.close(code)
            if pool is not None:
                pool.close()  # stops the reader steps
        if args.report:
            _write_report(manifest.run_dir, store, console)
        store.close()
        if args.state_dir is not None:
            if publisher.copy_error is not None:
                console.print(
                    f"warning: {manifest.run_dir / 'state.db'} is not up to date ({publisher.copy_error}); "
                    f"the run's state is in {db_path}: the next `gpupack run --state-dir` on this node uses it",
                    highlight=False, soft_wrap=True,
                )
            statedir.finish(db_path, copied=publisher.copy_error is None)
        return code


def _write_report(run_dir: Path, store: Store, console: Console) -> None:
    """report/ without timeline.png (README "The run directory"), and only when the run changed
    what it shows: a rerun over 10,000 finished experiments redrew them all, for nothing."""
    html = run_dir / "report" / "report.html"
    mark = store.change_mark()
    if store.meta().get("report_mark") == mark and html.is_file():
        console.print(f"report: {html} (nothing changed)", highlight=False, soft_wrap=True)
        return
    try:
        from .report import write_report

        paths = write_report(run_dir, png=False, store=store)
        store.set_meta({"report_mark": mark})
        console.print(f"report: {paths['html']}", highlight=False, soft_wrap=True)
    except Exception as exc:  # a report is a convenience; never let it turn a good run into a failure
        console.print(f"warning: could not write the report: {exc}", highlight=False)


def _refuse_unfit(manifest: manifest_mod.Manifest, inventory: Sequence[Any], headroom: int) -> None:
    from . import policy
    from .request import request_for

    snaps = [policy.GpuSnapshot(g.node, g.index, g.total_bytes, None) for g in inventory]
    problems = []
    reasons: dict[tuple[int, int | None, int, int], str | None] = {}  # a 10,000-run grid has a few shapes
    for exp in manifest.experiments:
        shape = (exp.gpus, exp.mem_bytes, exp.cpus, exp.nodes)  # all that unfit_reason looks at
        if shape not in reasons:
            reasons[shape] = policy.unfit_reason(request_for(exp, exp.mem_bytes), snaps, headroom)
        why = reasons[shape]
        if why:
            field = "nodes" if "whole nodes of" in why else "gpus" if "GPU" in why and "memory" not in why else "mem"
            problems.append(f"{manifest.path}: {exp.name}: {field}: {why}")
    if problems:
        raise GpupackError("\n".join(problems))


def _refuse_bad_preempt_signal() -> None:
    """GPUPACK_PREEMPT_SIGNAL in the scheduler's environment (a manifest's `env` is checked with
    the manifest): a signal neither gpupack nor `gpupack.job` understands is refused up front."""
    from .signals import preempt_signal

    try:
        preempt_signal(os.environ)
    except ValueError as exc:
        raise GpupackError(f"environment: {exc}") from None


def plan(
    manifest_path: Path, gpus: str | None, time_limit: str | None, as_json: bool, out: IO[str],
    console: Console | None = None,
) -> int:
    """Predict the run's timeline with the run's own policy; nothing is launched."""
    from . import manifest as manifest_mod
    from .gpus import GpuSpecError, parse_gpu_spec
    from .simulate import MAX_EXPERIMENTS, plan_data, render_plan

    spec = gpus or os.environ.get("GPUPACK_GPUS") or "4x80GB"
    try:
        inventory = parse_gpu_spec(spec, "node")
        limit = manifest_mod.parse_duration(time_limit) if time_limit else None
    except (GpuSpecError, ValueError) as exc:
        raise GpupackError(str(exc) if isinstance(exc, GpuSpecError) else f"--time: {exc}") from None
    manifest = _load_manifest(manifest_path, inventory)
    if len(manifest.experiments) > MAX_EXPERIMENTS:
        raise GpupackError(
            f"{manifest_path}: {len(manifest.experiments)} experiments, more than the {MAX_EXPERIMENTS} `gpupack plan` "
            "simulates (its cost grows with the square of their number); plan a smaller grid of the same "
            "shapes: `gpupack run` has no such limit"
        )
    _refuse_unfit(manifest, inventory, 0)
    data = plan_data(manifest, inventory, limit)
    if as_json:
        json.dump(data, out, indent=1)
        out.write("\n")
    else:
        render_plan(data, console or new_console())
    return EXIT_OK


def _check_run_dir(run_dir: Path) -> None:
    # status.json alone: a scheduler with --state-dir before its first copy into the run directory
    if not (run_dir / "state.db").is_file() and not (run_dir / "status.json").is_file():
        raise GpupackError(f"{run_dir}: not a gpupack run directory (no state.db)")


def _open_store(run_dir: Path) -> Store:
    """The run's database read-only, from any host and on a read-only copy (reader.py)."""
    from .reader import open_database

    _check_run_dir(run_dir)
    try:
        return open_database(run_dir)
    except StoreError as exc:
        raise GpupackError(str(exc)) from None


def status(run_dir: Path, as_json: bool, out: IO[str], console: Console | None = None) -> int:
    from .reader import open_run

    _check_run_dir(run_dir)
    try:
        source = open_run(run_dir)
    except StoreError as exc:
        raise GpupackError(str(exc)) from None
    try:
        now = time.time()
        data = source.status()
        line = source.writer_line(now)
    finally:
        source.close()
    if as_json:
        from .jsonout import dumps_rows

        out.write(dumps_rows({"run": data["run"], "scheduler": line, "source": source.source, **data}, "experiments"))
        return EXIT_OK
    from .dashboard import status_table

    # Colours only in a terminal: piped, the table is plain text and rich is not even imported.
    out.write(status_table(data, console=console or (new_console() if out.isatty() else None)))
    if line:
        out.write(line + "\n")
    return EXIT_OK


def reset(run_dir: Path, patterns: Sequence[str], console: Console) -> int:
    _check_run_dir(run_dir)
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
    from .reader import watch as watch_view

    _check_run_dir(run_dir)
    try:
        return watch_view(run_dir, console, interval_s)
    except StoreError as exc:
        raise GpupackError(str(exc)) from None


def report(run_dir: Path, console: Console, out_dir: Path | None = None) -> int:
    store = _open_store(run_dir)
    from .report import write_report

    try:
        written = write_report(run_dir, out_dir=out_dir, store=store)
    except OSError as exc:  # report/ in a read-only run directory: say where else it can go
        where = out_dir or run_dir / "report"
        raise GpupackError(f"{where}: cannot write the report: {exc.strerror}; choose another place with --out DIR") from None
    finally:
        store.close()
    for kind, path in written.items():
        console.print(f"{kind}: {path}", highlight=False)
    return EXIT_OK


def results(run_dir: Path, by: Sequence[str] | None, fmt: str, out: IO[str]) -> int:
    store = _open_store(run_dir)
    from . import results as results_mod

    problems: list[str] = []
    try:
        rows = results_mod.collect(run_dir, problems, store=store)
    finally:
        store.close()
    for line in problems:
        print(f"gpupack: warning: {line}", file=sys.stderr)
    try:
        table = results_mod.aggregate(rows, list(by) if by else None)
    except ValueError as exc:
        raise GpupackError(str(exc)) from None
    out.write(results_mod.render(table, fmt))
    return EXIT_OK

