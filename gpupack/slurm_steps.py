"""Job steps: `srun_argv()`, the step for one experiment, pure; which GPU mode the cluster takes;
and `StepThrottle`, the backpressure on step creation. srun.py's SrunLauncher runs them.

Two GPU modes, since a step with `--gres=gpu:k` gets the lowest free GPUs of Slurm's choosing,
not gpupack's:
    "gres-none"  `--gres=none`: the step holds no GPU, gpupack sets CUDA_VISIBLE_DEVICES inside
                 the step. Needs devices that are not cgroup-constrained (slurmstepd strips a
                 CUDA_VISIBLE_DEVICES passed in, so it is set by `env` in the step's argv).
    "overlap"    `--overlap --gpus=<all of the node's job GPUs>`: works with
                 ConstrainDevices=yes (the step may open every GPU of the job on that node),
                 narrowed the same way; costs CPU isolation (overlapping steps share cores).
`gpu_mode()` picks gres-none unless the cluster may constrain devices (task/cgroup).

`StepThrottle`: srun retries by itself when slurmctld answers "step creation temporarily
disabled"; launching more steps meanwhile only adds retry traffic, so the launcher pauses while
any step waits and never starts more than N steps per second.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .slurm import Runner, ask, run_command

GpuMode = Literal["gres-none", "overlap"]
GPU_MODES: tuple[GpuMode, ...] = ("gres-none", "overlap")


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
    return gpu_mode(ask(run, ["scontrol", "show", "config"]))


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
