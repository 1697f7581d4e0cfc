"""Slurm facts and actions for a gpupack run inside one allocation.

Every Slurm quirk gpupack depends on lives here (observed on Slurm 22.05, slurm/README.md):

- `Allocation.from_env(os.environ)`: the job's nodes, GPUs and CPUs, read once. `gpu_ids` are
  the job's GPUs on a node as the batch script's CUDA_VISIBLE_DEVICES lists them, which is the
  value a step's CUDA_VISIBLE_DEVICES needs in both GPU modes below (global indices where devices
  are not cgroup-constrained, 0..k-1 where they are) and the NVML index of each GPU the job holds.
  With several nodes, `gpus_on(node)` gives each node's own GPUs, read from `scontrol show job -d`
  (nodes may differ); the batch node is SLURMD_NODENAME.
- `end_time()` / `AllocationClock`: 22.05 exports no end time, so ask squeue (`%L`, time left)
  and fall back to `scontrol show job` (EndTime); `scontrol update TimeLimit` can move it, hence
  the periodic refresh. Never raises: unknown is None.
- `requeue()` / `resubmit()`: end-of-allocation actions; the caller bounds them with
  `Allocation.restart_count` (--max-requeues).
- `srun_argv()`: the job step for one experiment, pure. Two GPU modes, since a step with
  `--gres=gpu:k` gets the lowest free GPUs of Slurm's choosing, not gpupack's:
    "gres-none"  `--gres=none`: the step holds no GPU, gpupack sets CUDA_VISIBLE_DEVICES inside
                 the step. Needs devices that are not cgroup-constrained (slurmstepd strips a
                 CUDA_VISIBLE_DEVICES passed in, so it is set by `env` in the step's argv).
    "overlap"    `--overlap --gpus=<all of the node's job GPUs>`: works with
                 ConstrainDevices=yes (the step may open every GPU of the job on that node),
                 narrowed the same way; costs CPU isolation (overlapping steps share cores).
  `gpu_mode()` picks gres-none unless the cluster may constrain devices (task/cgroup).
- `StepThrottle`: srun retries by itself when slurmctld answers "step creation temporarily
  disabled"; launching more steps meanwhile only adds retry traffic, so the launcher pauses
  while any step waits and never starts more than N steps per second.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .hooks import Hooks

GpuMode = Literal["gres-none", "overlap"]
GPU_MODES: tuple[GpuMode, ...] = ("gres-none", "overlap")

# Runs a command, returns its stdout, or None when it could not run or exited non-zero.
Runner = Callable[[Sequence[str]], "str | None"]

_TIMEOUT_S = 15.0  # a wedged slurmctld must not hang the engine


def run_command(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


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
    out = run(["scontrol", "show", "job", "-d", job_id])
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
    out = run(["scontrol", "show", "hostnames", nodelist])
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
    out = run(["scontrol", "show", "job", job_id])
    if not out:
        return None
    return parse_scontrol(out, ("Command", "WorkDir", "StdOut", "StdErr", "StdIn", "Comment"))


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
    out = run(["squeue", "-h", "-j", job_id, "-o", "%L"])
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


# --- requeue / resubmit -------------------------------------------------------------------------


def requeue(job_id: str, *, run: Runner = run_command) -> bool:
    """`scontrol requeue J`. False where the job may not be requeued (--no-requeue,
    JobRequeue=0): "Requested operation is presently disabled".

    Slurm then sends SIGTERM to the batch process, i.e. the caller, and SIGKILL KillWait seconds
    later: call it last, with SIGTERM already treated as "stopping"."""
    return run(["scontrol", "requeue", job_id]) is not None


def resubmit(
    script: str, args: Sequence[str], *, job_id: str | None = None, run: Runner = run_command
) -> str | None:
    """`sbatch SCRIPT ARGS...` for where requeue is disabled; returns the new job id or None.

    SCRIPT is the original batch script: `job_script()` reads it from `scontrol show job`
    (Command=, the path given to sbatch; sbatch runs a spooled copy). ARGS are the arguments the
    script received: for parallel.slurm, gpupack's own `run` arguments. With `job_id`, the time
    limit, partition, account, QOS and working directory of that job are carried over, since
    options given on the original sbatch command line would otherwise be lost."""
    opts: list[str] = []
    info = show_job(job_id, run=run) if job_id else None
    if info:
        for key, opt in (("TimeLimit", "--time"), ("Partition", "--partition"),
                         ("Account", "--account"), ("QOS", "--qos"), ("WorkDir", "--chdir")):
            value = info.get(key, "")
            if value not in ("", "(null)", "N/A", "UNLIMITED"):
                opts.append(f"{opt}={value}")
    out = run(["sbatch", "--parsable", *opts, script, *args])
    if not out or not out.strip():
        return None
    return out.strip().split(";")[0]  # --parsable: "jobid[;cluster]"


def job_script(job_id: str, args: Sequence[str] = (), *, run: Runner = run_command) -> str | None:
    """Path of the batch script the job was submitted with; None for `sbatch --wrap` or stdin.

    `scontrol show job` joins the path and the script's arguments with spaces (Command=); the
    known `args` are cut off the end, so a path with spaces survives when they are given."""
    command = (show_job(job_id, run=run) or {}).get("Command", "").strip()
    if not command or command == "(null)":
        return None
    tail = " ".join(args)
    if tail and command.endswith(" " + tail):
        return command[: -len(tail) - 1].strip()
    return command.split()[0]


def engine_hooks(
    allocation: Allocation, max_requeues: int, *, run_args: Sequence[str] | None = None,
    run: Runner = run_command,
) -> Hooks:
    """The engine's view of Slurm: time left (refreshed now and then) and the end-of-allocation
    action: requeue while `allocation.restart_count < max_requeues`, else nothing; where requeue
    is disabled, resubmit the batch script with `run_args` (default: this process's arguments
    after `run`, i.e. what parallel.slurm passed to `gpupack run`)."""
    job = allocation.job_id
    clock = AllocationClock(job, query=lambda j, now: end_time(j, now, run=run))
    if run_args is None:
        argv = sys.argv
        run_args = argv[argv.index("run") + 1 :] if "run" in argv else []
    args = list(run_args)

    def end_of_allocation() -> str | None:
        done = allocation.restart_count
        if done >= max_requeues:
            return f"not requeued: job {job} has been requeued {done} times (--max-requeues {max_requeues})"
        if requeue(job, run=run):
            return f"requeued job {job} (run {done + 2})"
        script = job_script(job, args, run=run)
        new = resubmit(script, args, job_id=job, run=run) if script else None
        if new:
            return f"requeue disabled for job {job}; resubmitted {script} as job {new}"
        return f"job {job} could neither be requeued nor resubmitted; submit it again to resume"

    return Hooks(
        time_left=clock.time_left_s,
        requeue=end_of_allocation,
        cpus_per_node=dict(zip(allocation.nodes, allocation.cpus_per_node)) or None,
        job_id=job,
        retry_failed=allocation.restart_count == 0,
    )


# --- job steps ----------------------------------------------------------------------------------


def srun_argv(
    *,
    name: str,
    node: str,
    gpu_indices: Sequence[int | str],
    cpus: int,
    mode: GpuMode,
    inner_argv: Sequence[str],
    node_gpus: int | None = None,
    nodes: Sequence[str] = (),
    master_addr: str = "",
) -> list[str]:
    """The `srun` command that runs `inner_argv` as one job step on `node` with exactly the GPUs
    `gpu_indices` (values for CUDA_VISIBLE_DEVICES, see Allocation.gpu_ids) and `cpus` cores.

    With `nodes` (K > 1, rank order, a multi-node experiment): one step of K tasks, one per
    node, each with those GPUs and cores on its node; every task sets RANK, NODE_RANK and
    GPUPACK_NODE_RANK to its node's position in GPUPACK_NODES (Slurm numbers tasks in its own
    node order, not in --nodelist's) and gets MASTER_ADDR=`master_addr`, the first node's address.

    --exact: the step gets its own cores (without it, it takes all of the job's CPUs and steps
    serialize). --mem=0: where memory is consumable and the job set --mem, a step without --mem
    holds all of the job's memory and steps serialize (observed on 22.05). --export=ALL: a job
    submitted with --export=NONE hands SLURM_EXPORT_ENV=NONE to srun, which would drop
    gpupack's variables. `env` sets CUDA_VISIBLE_DEVICES inside the step, since slurmstepd
    strips one passed in. In "overlap" mode `node_gpus` is the number of GPUs the job holds on
    `node` (None: no GPU option, Slurm's default for a step, all of them)."""
    if mode not in GPU_MODES:
        raise ValueError(f"unknown GPU mode {mode!r}: expected one of {', '.join(GPU_MODES)}")
    if cpus < 1:
        raise ValueError(f"cpus must be >= 1, got {cpus}")
    if not inner_argv or "=" in inner_argv[0]:
        raise ValueError(f"inner_argv must start with a command, got {list(inner_argv)!r}")
    if len(nodes) > 1:
        k = len(nodes)
        where = ["-N", str(k), "-n", str(k), "--ntasks-per-node=1", f"--nodelist={','.join(nodes)}"]
        inner_argv = ["env", f"MASTER_ADDR={master_addr or nodes[0]}", "/bin/sh", "-c", _RANK, "gpupack-rank", *inner_argv]
    else:
        where = ["-N1", "-n1", f"--nodelist={node}"]
    argv = [
        "srun", "--exact", *where, f"--job-name={name}",
        f"--cpus-per-task={cpus}", "--mem=0", "--kill-on-bad-exit=1", "--export=ALL",
    ]
    if not gpu_indices:
        # A step with no GPU option asks for all of the job's GPUs and waits for them.
        return argv + ["--gres=none", "env", "-u", "CUDA_VISIBLE_DEVICES", *inner_argv]
    if mode == "overlap":
        # Without --gres a step asks for all of the job's GPUs on its node (Slurm >= 20.11).
        # --gpus=k, not --gres=gpu:k: in a job asked with --gpus=N over unlike nodes (4 + 2),
        # 22.05 refuses --gres=gpu:4 on the node holding 4 ("Invalid generic resource").
        many = len(nodes) > 1
        argv += ["--overlap"] + ([f"--gpus-per-node={node_gpus}" if many else f"--gpus={node_gpus}"] if node_gpus else [])
    else:
        argv += ["--gres=none"]
    visible = ",".join(str(i) for i in gpu_indices)
    return argv + ["env", f"CUDA_VISIBLE_DEVICES={visible}", *inner_argv]


# A multi-node step's task: its rank is its node's place in GPUPACK_NODES (SLURM_NODEID where
# that fails), then the command.
_RANK = (
    'r=0; for n in $(echo "$GPUPACK_NODES" | tr , " "); do [ "$n" = "$SLURMD_NODENAME" ] && break; r=$((r + 1)); done; '
    '[ "$r" -lt "${GPUPACK_NNODES:-0}" ] || r=${SLURM_NODEID:-0}; '
    'export RANK=$r NODE_RANK=$r GPUPACK_NODE_RANK=$r; exec "$@"'
)


def gpu_mode(config_text: str | None, override: str | None = None) -> GpuMode:
    """The GPU mode for this cluster. `override` (e.g. env GPUPACK_SLURM_GPU_MODE) wins unless it
    is empty or "auto". Devices can only be constrained by task/cgroup with ConstrainDevices=yes
    (`scontrol show config` prints cgroup.conf when it is loaded); when that is unknown, overlap
    is the mode that works on both kinds of cluster."""
    if override and override != "auto":
        if override not in GPU_MODES:
            raise ValueError(
                f"GPU mode {override!r} is not one of auto, {', '.join(GPU_MODES)}"
            )
        return override
    if config_text is None:
        return "overlap"
    conf = dict(
        (k.strip(), v.strip())
        for k, sep, v in (line.partition("=") for line in config_text.splitlines())
        if sep
    )
    if "cgroup" not in conf.get("TaskPlugin", ""):
        return "gres-none"
    constrain = conf.get("ConstrainDevices")
    return "gres-none" if constrain is not None and constrain.lower() == "no" else "overlap"


def detect_gpu_mode(override: str | None = None, *, run: Runner = run_command) -> GpuMode:
    if override and override != "auto":
        return gpu_mode(None, override)
    return gpu_mode(run(["scontrol", "show", "config"]))


# --- step-creation backpressure ---------------------------------------------------------------

_WAITING = re.compile(r"step creation (temporarily|still) disabled|Requested nodes are busy")
_CREATED = re.compile(r"Step created for job")


def step_waiting(line: str) -> bool:
    """srun's stderr says the step is queued behind busy resources (srun retries by itself)."""
    return bool(_WAITING.search(line))


def step_created(line: str) -> bool:
    """srun's stderr says a step that was waiting has now been created."""
    return bool(_CREATED.search(line))


@dataclass
class StepThrottle:
    """At most `max_per_s` new steps in any second, none while a step waits for creation.

    The launcher calls `may_launch(now)` before each srun, `launched(key, now)` after it,
    `observe(key, text)` with new stderr text of a step, and `ended(key)` when its srun exits."""

    max_per_s: int = 5
    _starts: deque[float] = field(default_factory=deque, init=False)
    _waiting: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if self.max_per_s < 1:
            raise ValueError(f"max_per_s must be >= 1, got {self.max_per_s}")

    def may_launch(self, now: float) -> bool:
        return not self._waiting and self.next_launch_at(now) <= now

    def next_launch_at(self, now: float) -> float:
        """Earliest time the rate allows another launch (ignores waiting steps)."""
        while self._starts and self._starts[0] <= now - 1.0:
            self._starts.popleft()
        if len(self._starts) < self.max_per_s:
            return now
        return self._starts[-self.max_per_s] + 1.0

    def launched(self, key: str, now: float) -> None:
        self._starts.append(now)

    def observe(self, key: str, text: str) -> None:
        for line in text.splitlines():
            if step_waiting(line):
                self._waiting.add(key)
            elif step_created(line):
                self._waiting.discard(key)

    def ended(self, key: str) -> None:
        self._waiting.discard(key)

    @property
    def waiting(self) -> frozenset[str]:
        return frozenset(self._waiting)
