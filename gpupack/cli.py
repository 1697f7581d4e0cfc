"""Command line: argument parsing only; each subcommand calls one function of commands.py."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from .exits import EXIT_BAD_INPUT, EXIT_STOPPED
from .signals import default_stop_signals

EPILOG = """exit codes: 0 all succeeded, 1 some failed, 2 bad input or run directory busy,
3 stopped early (preempted / allocation ending; the next run resumes)"""


def _seconds(text: str) -> float:
    from .manifest import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpupack",
        description="Pack ML experiments onto the GPUs of one allocation; skip what finished.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spec = "GPUSxSIZE (4x80GB: one node) or NODESxGPUSxSIZE (2x4x80GB: 2 nodes of 4); '+' joins kinds of node"
    gpus_help = f"simulated GPUs instead of NVML: {spec} (also env GPUPACK_GPUS)"

    p = sub.add_parser("run", help="run a manifest", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    p.add_argument("--gpus", metavar="SPEC", help=gpus_help)
    p.add_argument("--poll", type=_seconds, default=5.0, metavar="S", help="seconds between ticks when nothing exits (default 5)")
    p.add_argument("--grace", type=_seconds, default=60.0, metavar="S", help="time experiments get to checkpoint after the preempt signal (default 60s)")
    p.add_argument("--log-every", type=_seconds, default=60.0, metavar="S", help="snapshot table interval in job logs (default 60s)")
    p.add_argument("--headroom", metavar="SIZE", help="GPU memory kept free on every GPU, e.g. 2GB (default 0)")
    p.add_argument("--srun-mode", choices=("auto", "gres-none", "overlap"), help="how job steps get their GPUs under Slurm (default auto; env GPUPACK_SRUN_MODE; see slurm/README.md)")
    p.add_argument("--max-requeues", type=int, default=10, metavar="N", help="requeue the Slurm job at most N times (default 10)")
    p.add_argument("--no-report", action="store_true", help="do not write report/ at the end")
    p.add_argument("--state-dir", type=Path, metavar="DIR", default=os.environ.get("GPUPACK_STATE_DIR") or None,
                   help="keep the live database on this node-local disk, copied back into the run directory every tick "
                   "and at the end (env GPUPACK_STATE_DIR; README \"The run directory\")")

    p = sub.add_parser("plan", help="predict a manifest's timeline with the run's own policy, without running")
    p.add_argument("manifest", type=Path)
    p.add_argument("--gpus", metavar="SPEC", help=f"the GPUs to plan for: {spec} (default 4x80GB, or env GPUPACK_GPUS)")
    p.add_argument("--time", metavar="DURATION", help="the allocation's length, e.g. 24h: what would not fit")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("status", help="one table of a run's experiments")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", action="store_true", help='{"run", "experiments": [...]}, for scripts')

    p = sub.add_parser("watch", help="live dashboard of a run from another terminal")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--interval", type=_seconds, default=2.0, metavar="S")

    p = sub.add_parser("report", help="write report/ (summary.json, timeline.png, report.html)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, metavar="DIR", help="write the files here instead of RUN_DIR/report (a read-only run directory)")

    p = sub.add_parser("results", help="tables of results.json metrics, mean +- 95%% CI over seeds")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--by", nargs="+", metavar="KEY", help="group by these grid keys (default: all but the seed)")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md")

    p = sub.add_parser("reset", help="forget outcomes so experiments run again")
    p.add_argument("run_dir", type=Path)
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="names or globs (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        default_stop_signals()
    from . import commands  # after parsing: `--help` and bad arguments import nothing more

    new_console = commands.new_console  # rich only where a command draws with it
    try:
        if args.command == "run":
            return commands.run(
                commands.RunArgs(
                    manifest=args.manifest, gpus=args.gpus, poll_s=args.poll, grace_s=args.grace,
                    log_every_s=args.log_every, headroom=args.headroom, srun_mode=args.srun_mode,
                    max_requeues=args.max_requeues, report=not args.no_report, state_dir=args.state_dir,
                    argv=tuple(_run_argv(argv)),
                ),
                new_console(),
            )
        if args.command == "plan":
            return commands.plan(args.manifest, args.gpus, args.time, args.json, sys.stdout, None if args.json else new_console())
        if args.command == "status":
            return commands.status(args.run_dir, args.json, sys.stdout)
        if args.command == "watch":
            return commands.watch(args.run_dir, args.interval, new_console())
        if args.command == "report":
            return commands.report(args.run_dir, new_console(), args.out)
        if args.command == "results":
            return commands.results(args.run_dir, args.by, args.format, sys.stdout)
        if args.command == "reset":
            return commands.reset(args.run_dir, args.patterns, new_console())
    except commands.GpupackError as exc:
        for line in str(exc).splitlines():
            print(f"gpupack: error: {line}", file=sys.stderr, flush=True)
        return exc.code
    except sqlite3.Error as exc:  # a read outside the store's transactions (disk, corruption)
        print(f"gpupack: error: state database: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `gpupack status --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_STOPPED
    return 2


def _run_argv(argv: Sequence[str] | None) -> list[str]:
    """What followed `run` on the command line (resubmission repeats it)."""
    words = list(sys.argv[1:] if argv is None else argv)
    return words[words.index("run") + 1 :] if "run" in words else words


if __name__ == "__main__":
    sys.exit(main())
