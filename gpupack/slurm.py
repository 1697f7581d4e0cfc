"""Slurm facts for a gpupack run inside one allocation, and the one way gpupack runs a Slurm
command. Launching job steps is slurm_steps.py's concern, the end of the allocation (requeue,
resubmit) slurm_requeue.py's; both ask through `run_command` here.

Every Slurm quirk gpupack depends on lives in these three files (observed on Slurm 22.05,
slurm/README.md):

- `run_command()` runs one Slurm command and raises SlurmError where there is no answer:
  SlurmMissing (no such binary), SlurmTimeout (a wedged slurmctld), SlurmFailed (exit code and
  stderr). Facts with a fallback take all three as "unknown" (`ask`); each caller says so.
- `Allocation.from_env(os.environ)`: the job's nodes, GPUs and CPUs, read once. `gpu_ids` are
  the job's GPUs on a node as the batch script's CUDA_VISIBLE_DEVICES lists them, which is the
  value a step's CUDA_VISIBLE_DEVICES needs in both GPU modes (slurm_steps.py; global indices
  where devices are not cgroup-constrained, 0..k-1 where they are) and the NVML index of each GPU
  the job holds. With several nodes, `gpus_on(node)` gives each node's own GPUs, read from
  `scontrol show job -d` (nodes may differ); the batch node is SLURMD_NODENAME.
- `end_time()` / `AllocationClock`: 22.05 exports no end time, so ask squeue (`%L`, time left)
  and fall back to `scontrol show job` (EndTime); `scontrol update TimeLimit` can move it, hence
  the periodic refresh. Never raises: unknown is None.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

_TIMEOUT_S = 15.0  # a wedged slurmctld must not hang the engine


class SlurmError(Exception):
    """A Slurm command gave no answer. Which way tells the caller what it may conclude: a
    missing binary is not a cluster, a timeout is a busy slurmctld (ask again later), a non-zero
    exit is Slurm's own "no" (a job that may not be requeued, an unknown job)."""

    def __init__(self, argv: Sequence[str], why: str):
        super().__init__(f"{' '.join(argv)}: {why}")
        self.argv = list(argv)


class SlurmMissing(SlurmError):
    """The command could not be started (not installed, not on PATH)."""


class SlurmTimeout(SlurmError):
    """No answer within the timeout."""


class SlurmFailed(SlurmError):
    """The command ran and exited non-zero; `stderr` says why."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str):
        super().__init__(argv, f"exit {returncode}: {stderr.strip()}" if stderr.strip() else f"exit {returncode}")
        self.returncode = returncode
        self.stderr = stderr


# Runs a command and returns its stdout; raises SlurmError when there is no answer.
Runner = Callable[[Sequence[str]], str]


def run_command(argv: Sequence[str], timeout_s: float = _TIMEOUT_S) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmTimeout(argv, f"no answer in {timeout_s:g} s") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmMissing(argv, str(exc)) from None
    if done.returncode != 0:
        raise SlurmFailed(argv, done.returncode, done.stderr)
    return done.stdout


def ask(run: Runner, argv: Sequence[str]) -> str | None:
    """stdout, or None for no answer of any kind, where the caller treats them all as "unknown"
    (facts with a fallback: slurm/README.md "Allocation facts"; unknown is never a wrong number)."""
    try:
        return run(argv)
    except SlurmError:
        return None


# --- allocation facts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: tuple[str, ...]
    gpu_ids: tuple[int, ...]  # the job's GPUs on each node (batch node's view; nodes assumed alike)
    cpus_per_node: tuple[int, ...]  # aligned with nodes; empty when unknown
    restart_count: int  # 0 on the first run, 1 after the first requeue, ...
    batch_node: str | None = None
    # Each node's GPUs, as a step there names them (only read when the job has several nodes).
    node_gpu_ids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def gpus_per_node(self) -> int:
        return len(self.gpu_ids)

    def gpus_on(self, node: str) -> tuple[int, ...]:
        """The job's GPUs on `node` (the batch node's view where nothing else is known)."""
        if node == self.batch_node or node not in self.node_gpu_ids:
            return self.gpu_ids
        return self.node_gpu_ids[node]

    def cpus_on(self, node: str) -> int | None:
        if node in self.nodes and len(self.cpus_per_node) == len(self.nodes):
            return self.cpus_per_node[self.nodes.index(node)]
        return None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, run: Runner = run_command) -> Allocation | None:
        """The allocation gpupack runs in, or None outside Slurm (no SLURM_JOB_ID)."""
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job_id:
            return None
        nodes = expand_nodelist(
            env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "", run=run
        )
        if not nodes and env.get("SLURMD_NODENAME"):
            nodes = (env["SLURMD_NODENAME"],)
        cpus = parse_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
        if len(cpus) != len(nodes):
            on_node = _int(env.get("SLURM_CPUS_ON_NODE"))
            cpus = (on_node,) * len(nodes) if on_node is not None else ()
        gpu_ids = _gpu_ids(env, max(len(nodes), 1))
        batch_node = env.get("SLURMD_NODENAME")
        per_node: dict[str, tuple[int, ...]] = {}
        if len(nodes) > 1:
            per_node = job_gpu_layout(job_id, run=run)
            # Where devices are cgroup-constrained a step numbers its GPUs 0..k-1, whatever
            # their index on the node: the batch step's CUDA_VISIBLE_DEVICES tells which.
            mine = per_node.get(batch_node or "")
            if mine is not None and mine != gpu_ids and gpu_ids == tuple(range(len(gpu_ids))):
                per_node = {n: tuple(range(len(ids))) for n, ids in per_node.items()}
        return cls(
            job_id=job_id,
            nodes=nodes,
            gpu_ids=gpu_ids,
            cpus_per_node=cpus,
            restart_count=_int(env.get("SLURM_RESTART_COUNT")) or 0,
            batch_node=batch_node,
            node_gpu_ids=per_node,
        )


def job_gpu_layout(job_id: str, *, run: Runner = run_command) -> dict[str, tuple[int, ...]]:
    """Each node's GPU indices from `scontrol show job -d J`, whose detail lines read
    `Nodes=n[1-2] CPU_IDs=0-15 Mem=0 GRES=gpu:4(IDX:0-3)` (one line per group of alike nodes).
    Empty when Slurm does not say."""
    out = ask(run, ["scontrol", "show", "job", "-d", job_id])
    layout: dict[str, tuple[int, ...]] = {}
    for line in (out or "").splitlines():
        line = line.strip()
        if not line.startswith("Nodes="):
            continue
        fields = dict(tok.partition("=")[::2] for tok in line.split())
        ids = gres_indices(fields.get("GRES", ""))
        for node in expand_nodelist(fields.get("Nodes", ""), run=run):
            layout[node] = ids
    return layout


def gres_indices(text: str) -> tuple[int, ...]:
    """GPU indices of a detailed GRES string: 'gpu:4(IDX:0-3)', 'gpu:a100:2(IDX:0,2)',
    'gpu:2(IDX:1-2),shard:0(0/8)' -> (0, 1, 2, 3), (0, 2), (1, 2); no GPU -> ()."""
    ids: list[int] = []
    for m in re.finditer(r"(?:^|,)\s*gpu(?::[^,(]*)?\(IDX:([0-9,\-]*)\)", text):
        for part in m[1].split(","):
            lo, _, hi = part.partition("-")
            if lo.isdigit():
                ids += range(int(lo), int(hi or lo) + 1)
    return tuple(ids)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def expand_nodelist(nodelist: str, *, run: Runner = run_command) -> tuple[str, ...]:
    """'a,b' -> (a, b) directly; a range like 'gpu[01-04]' needs Slurm's own expansion."""
    nodelist = nodelist.strip()
    if not nodelist or nodelist == "(null)":
        return ()
    if "[" not in nodelist:
        return tuple(n for n in nodelist.split(",") if n)
    out = ask(run, ["scontrol", "show", "hostnames", nodelist])
    return tuple(out.split()) if out else ()


def parse_cpus_per_node(text: str) -> tuple[int, ...]:
    """SLURM_JOB_CPUS_PER_NODE: '16', '16(x2)', '32(x2),16' -> one count per node."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return ()
        counts += [int(m[1])] * int(m[2] or 1)
    return tuple(counts)


def parse_gres_gpus(text: str) -> int | None:
    """GPU count in a gres/tres string: 'gpu:4', 'gres:gpu:a100:2', 'gpu:a100:2(IDX:0-1),shard:8'."""
    total = None
    for item in text.replace("=", ":").split(","):
        fields = re.sub(r"\(.*?\)", "", item.strip()).split(":")
        if fields and fields[0] in ("gres", "gres/gpu"):
            fields = (["gpu"] if fields[0] == "gres/gpu" else []) + fields[1:]
        if fields and fields[0] == "gpu":
            n = _int(fields[-1]) if len(fields) > 1 else 1
            if n is not None:
                total = (total or 0) + n
    return total


def _int_list(text: str | None) -> tuple[int, ...] | None:
    """'0,1,2,3' -> (0, 1, 2, 3); None if any entry is not an index (UUIDs, MIG names)."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        return None


def _gpu_ids(env: Mapping[str, str], n_nodes: int) -> tuple[int, ...]:
    job_gpus = _int_list(env.get("SLURM_JOB_GPUS"))
    count = len(job_gpus) if job_gpus else None
    # SLURM_GPUS_PER_NODE and SLURM_GPUS are "[type:]count"; SLURM_GPUS (--gpus) is per job.
    if count is None and env.get("SLURM_GPUS_ON_NODE"):
        count = _int(env["SLURM_GPUS_ON_NODE"])
    if count is None and env.get("SLURM_GPUS_PER_NODE"):
        count = _int(env["SLURM_GPUS_PER_NODE"].rsplit(":", 1)[-1])
    if count is None and env.get("SLURM_JOB_GRES"):
        count = parse_gres_gpus(env["SLURM_JOB_GRES"])
    if count is None and env.get("SLURM_GPUS"):
        total = _int(env["SLURM_GPUS"].rsplit(":", 1)[-1])
        count = total // n_nodes if total else None
    if not count:
        return ()
    # Slurm sets the batch step's CUDA_VISIBLE_DEVICES to the job's GPUs as a step can name
    # them: global indices, or 0..k-1 when ConstrainDevices renumbers them. Prefer it.
    cvd = _int_list(env.get("CUDA_VISIBLE_DEVICES"))
    if cvd and len(cvd) == count:
        return cvd
    if job_gpus and len(job_gpus) == count:
        return job_gpus
    return tuple(range(count))


# --- end time -----------------------------------------------------------------------------------

_NO_LIMIT = ("UNLIMITED", "INFINITE")
_UNKNOWN = ("", "INVALID", "NOT_SET", "N/A", "UNKNOWN", "NONE")


def parse_slurm_duration(text: str) -> float | None:
    """'1-02:03:04', '02:03:04', '2:00' (m:s), '5' (min) -> seconds; 'UNLIMITED' -> inf; junk -> None."""
    text = text.strip()
    if text.upper() in _NO_LIMIT:
        return math.inf
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days, a, b, c = (int(g) if g else None for g in m.groups())
    assert a is not None
    if c is not None:  # [d-]h:m:s
        h, mi, s = a, b or 0, c
    elif b is not None:  # d-h:m, or m:s
        h, mi, s = (a, b, 0) if days is not None else (0, a, b)
    else:  # d-h, or minutes
        h, mi, s = (a, 0, 0) if days is not None else (0, a, 0)
    return float((((days or 0) * 24 + h) * 60 + mi) * 60 + s)


def show_job(job_id: str, *, run: Runner = run_command) -> dict[str, str] | None:
    """`scontrol show job J` as a dict. Command=, WorkDir= and Std*= take the rest of their line
    (paths and arguments may contain spaces)."""
    out = ask(run, ["scontrol", "show", "job", job_id])
    if not out:
        return None
    return parse_scontrol(out, ("Command", "WorkDir", "StdOut", "StdErr", "StdIn", "Comment"))


# Job states in which the allocation still runs; any other (CANCELLED, TIMEOUT, PREEMPTED,
# NODE_FAIL, COMPLETING, REQUEUED...) means Slurm is ending it.
_RUNNING_STATES = ("RUNNING", "SUSPENDED", "CONFIGURING", "RESIZING")


def job_ending(job_id: str, *, run: Runner = run_command) -> str | None:
    """Why Slurm is ending job J: its state (COMPLETING after `scancel`, TIMEOUT...), or
    "preempted" while a preempted job runs out its GraceTime; None while it runs on or when
    Slurm does not answer. slurmctld records either before it signals the job's steps, so a
    step killed by that signal can be told from one that failed on its own. (A preemption with
    GraceTime signals the steps at once but the batch step, gpupack, only when the grace is over.)"""
    info = show_job(job_id, run=run)
    if not info:
        return None
    state = info.get("JobState", "")
    if state and state not in _RUNNING_STATES:
        return state
    if info.get("PreemptTime", "None") not in ("None", "Unknown", ""):
        return "preempted"
    return None


def parse_scontrol(text: str, whole_line: Sequence[str] = ()) -> dict[str, str]:
    """`scontrol show ...` output as a dict of its key=value tokens (the first of each key); a
    line starting with one of `whole_line` keys gives that key the rest of the line."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        key, _, rest = line.partition("=")
        if key in whole_line:
            info[key] = rest
            continue
        for token in line.split():
            k, sep, v = token.partition("=")
            if sep:
                info.setdefault(k, v)
    return info


def end_time(job_id: str, now: float, *, run: Runner = run_command) -> float | None:
    """Unix time the allocation ends: math.inf without a limit, None when unknown. Never raises."""
    out = ask(run, ["squeue", "-h", "-j", job_id, "-o", "%L"])
    left = parse_slurm_duration(out.strip().splitlines()[0]) if out and out.strip() else None
    if left is not None:
        return now + left
    info = show_job(job_id, run=run)
    if info is None:
        return None
    if info.get("TimeLimit", "").upper() in _NO_LIMIT:
        return math.inf
    try:
        return time.mktime(time.strptime(info.get("EndTime", ""), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None  # "Unknown" right after a requeue


@dataclass
class AllocationClock:
    """Time left in the allocation, asking Slurm at most every `refresh_s` seconds.

    A failed query keeps the last known end (a busy slurmctld must not make the limit vanish)."""

    job_id: str
    refresh_s: float = 120.0
    query: Callable[[str, float], float | None] = end_time
    _end: float | None = field(default=None, init=False)
    _asked_at: float | None = field(default=None, init=False)

    def end(self, now: float) -> float | None:
        if self._asked_at is None or now - self._asked_at >= self.refresh_s:
            self._asked_at = now
            try:
                fresh = self.query(self.job_id, now)
            except Exception:  # noqa: BLE001 - a clock must not take the run down
                fresh = None
            if fresh is not None:
                self._end = fresh
        return self._end

    def time_left_s(self, now: float) -> float | None:
        """Seconds left (>= 0); None when unlimited or unknown (the policy then never refuses)."""
        end = self.end(now)
        if end is None or math.isinf(end):
            return None
        return max(0.0, end - now)
