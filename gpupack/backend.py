"""Where a run runs, chosen once: this machine alone (LocalBackend) or the Slurm allocation the
run is inside (SlurmBackend). Each gives `gpupack run` the same few things: the job it belongs to,
the GPUs (probe), how an experiment starts (launcher) and what happens at the end of the
allocation (the engine's hooks: time left, requeue). `commands.run` asks; it does not branch on
Slurm. The pattern is submitit's job environment (slurm/README.md "End of the allocation": requeue)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import slurm, slurm_requeue, slurm_steps
from .gpus import GpuProbe, open_probe
from .hooks import Hooks
from .launch import LocalLauncher

if TYPE_CHECKING:
    from .pool import PoolProbe
    from .slurm_nodes import NodeWatch


class Backend(Protocol):
    @property
    def job_id(self) -> str | None:
        """The Slurm job this run is (None: none)."""
        ...

    def probe(self, gpus: str | None, run_dir: str, poll_s: float) -> tuple[GpuProbe, list[str]]:
        """The GPUs of every node and the warnings to log; raises GpuSpecError or NvmlError."""
        ...

    def launcher(self, srun_mode: str | None) -> LocalLauncher: ...

    def hooks(self, max_requeues: int, run_args: Sequence[str]) -> Hooks: ...

    def close(self) -> None:
        """Stops what probe() started (other nodes' reader steps)."""
        ...


def _hostname() -> str:
    return socket.gethostname().split(".")[0]


@dataclass
class LocalBackend:
    """No allocation: this machine's GPUs (NVML, or simulated 4x80GB with a warning), setsid
    children, no time limit and nothing to requeue."""

    env: Mapping[str, str]
    job_id: str | None = None

    def probe(self, gpus: str | None, run_dir: str, poll_s: float) -> tuple[GpuProbe, list[str]]:
        probe, note = open_probe(gpus, _hostname(), self.env, "4x80GB")
        return probe, [note] if note else []

    def launcher(self, srun_mode: str | None) -> LocalLauncher:
        return LocalLauncher()

    def hooks(self, max_requeues: int, run_args: Sequence[str]) -> Hooks:
        return Hooks()

    def close(self) -> None:
        pass


@dataclass
class SlurmBackend:
    """Inside an allocation (slurm.py's Allocation, read once): its GPUs (other nodes' through a
    reader step each, pool.py), one job step per attempt (srun.py), squeue's time left and
    requeue or resubmission at the end (slurm_requeue.engine_hooks)."""

    allocation: slurm.Allocation
    env: Mapping[str, str]
    _pool: PoolProbe | None = field(default=None, init=False)
    _watch: NodeWatch | None = field(default=None, init=False)

    @property
    def job_id(self) -> str | None:
        return self.allocation.job_id

    def probe(self, gpus: str | None, run_dir: str, poll_s: float) -> tuple[GpuProbe, list[str]]:
        allocation = self.allocation
        node = (allocation.batch_node or allocation.nodes[0]) if allocation.nodes else _hostname()
        fallback = f"{allocation.gpus_per_node}x80GB" if allocation.gpus_per_node else "4x80GB"
        probe, note = open_probe(
            gpus, node, self.env, fallback, allocation_gpus=allocation.gpus_per_node, names=allocation.nodes
        )
        notes = [note] if note else []
        if len(allocation.nodes) > 1:
            from .pool import for_allocation  # every other node's GPUs through a reader step

            # The other nodes simulate GPUs too where this one does (--gpus, or no GPU found here).
            spec = gpus or self.env.get("GPUPACK_GPUS") or (fallback if note else None)
            self._pool, self._watch, left_out = for_allocation(probe, allocation, run_dir, spec, poll_s, self.env)
            probe = self._pool
            notes += left_out
        return probe, notes

    def launcher(self, srun_mode: str | None) -> LocalLauncher:
        from .srun import SrunLauncher

        allocation, watch = self.allocation, self._watch
        mode = slurm_steps.detect_gpu_mode(srun_mode or self.env.get("GPUPACK_SRUN_MODE"))
        lost = None if watch is None else (lambda force: watch.lost(time.time(), force))
        node_gpus = {n: len(allocation.gpus_on(n)) for n in allocation.nodes}
        job = allocation.job_id
        return SrunLauncher(
            mode, node_gpus=node_gpus, here=self.env.get("SLURMD_NODENAME"), lost_nodes=lost,
            job_ending=lambda: slurm.job_ending(job),
        )

    def hooks(self, max_requeues: int, run_args: Sequence[str]) -> Hooks:
        return slurm_requeue.engine_hooks(self.allocation, max_requeues, run_args=run_args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()  # stops the reader steps


def backend_for(env: Mapping[str, str] = os.environ) -> Backend:
    """SlurmBackend inside an allocation (SLURM_JOB_ID and friends), else LocalBackend."""
    allocation = slurm.Allocation.from_env(env)
    return LocalBackend(env) if allocation is None else SlurmBackend(allocation, env)
