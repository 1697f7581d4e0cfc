"""SrunLauncher: each attempt one job step of the current allocation, started by a local `srun`
client run like launch.py's LocalLauncher runs a command (the same wrapper, process group and
exit file). Owns what launching needs from Slurm: the step's argv, the step-creation throttle and
a lost node's verdict. It sits on the Slurm side: it imports launch.py, never the reverse."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .launch import Handle, LaunchSpec, LocalLauncher, command_argv
from .slurm_steps import GpuMode, StepThrottle, srun_argv
from .slurm_nodes import node_address, node_failures, srun_env


class SrunLauncher(LocalLauncher):
    """Each attempt is one job step of the current allocation, started by a local srun client
    (srun forwards the signals it gets to the step's tasks).

    Step creation is throttled: while any step's srun reports "step creation temporarily
    disabled" (it retries by itself) no new step is started, so slurmctld never sees a storm."""

    kind = "srun"
    command_is_child = False  # the wrapper's child is the srun client; the step records the command's pid
    WATCH_S = 30.0  # srun says it waits within a second of starting; stop looking after this

    def __init__(
        self,
        mode: GpuMode,
        node_gpus: int | Mapping[str, int] | None = None,
        max_steps_per_s: int = 5,
        here: str | None = None,
        lost_nodes: Callable[[bool], Mapping[str, str]] | None = None,
        job_ending: Callable[[], str | None] | None = None,
    ):
        """`node_gpus`: the job's GPU count on every node, or per node (overlap mode asks for
        all of them). `lost_nodes(force)`: the allocation's lost nodes with why (NodeWatch).
        `job_ending()`: why Slurm is ending the job, None while it runs
        (slurm.job_ending)."""
        self.here = here  # the Slurm node this gpupack runs on (None: a login node, not one of the job's)
        self.mode = mode
        self.node_gpus = node_gpus
        self.lost_nodes = lost_nodes
        self.job_ending = job_ending
        self._ending: str | None = None  # once Slurm ends the job, it stays ending
        self.throttle = StepThrottle(max_steps_per_s)
        self._watched: dict[str, tuple[Path, int, float]] = {}  # name -> (log, offset, launched at)
        self._steps: dict[str, tuple[Path, int, tuple[str, ...]]] = {}  # name -> (log, offset at launch, nodes)
        self._addresses: dict[str, str] = {}  # node -> NodeAddr (MASTER_ADDR of multi-node steps)

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        # Without SLURM_GPUS, which srun would take as --gpus; a multi-node step's MASTER_ADDR:
        # the step sets it (slurm_steps.py).
        return srun_env(spec.env)

    def argv(self, spec: LaunchSpec) -> list[str]:
        node_gpus = self.node_gpus
        if isinstance(node_gpus, Mapping):
            node_gpus = node_gpus.get(spec.node)
        master_addr = ""
        if len(spec.nodes) > 1:
            if spec.nodes[0] not in self._addresses:
                self._addresses[spec.nodes[0]] = node_address(spec.nodes[0])
            master_addr = self._addresses[spec.nodes[0]]
        return srun_argv(
            name=spec.name,
            node=spec.node,
            gpu_indices=spec.cuda_ids,  # what CUDA_VISIBLE_DEVICES says, not positions
            cpus=spec.cpus,
            mode=self.mode,
            inner_argv=command_argv(spec),
            node_gpus=node_gpus,
            nodes=spec.nodes,
            master_addr=master_addr,
        )

    def runs_here(self, node: str) -> bool:
        return self.here is not None and node == self.here

    def command_here(self, spec: LaunchSpec) -> bool:
        # A multi-node step runs one command per node, all recording their pid in the one file:
        # srun tells them all instead.
        return self.runs_here(spec.node) and len(spec.nodes) <= 1

    def launch(self, spec: LaunchSpec) -> Handle:
        offset = spec.log_path.stat().st_size if spec.log_path.exists() else 0
        handle = super().launch(spec)
        now = time.monotonic()  # the throttle's clock, as may_launch() is given it
        self.throttle.launched(spec.name, now)
        self._watched[spec.name] = (spec.log_path, offset, now)
        self._steps[spec.name] = (spec.log_path, offset, spec.nodes or (spec.node,))
        return handle

    def lost(self, name: str, code: int | None) -> str | None:
        """srun exits 0 when the step's node fails under it, saying `Node failure on n2` on
        stderr (the attempt's log): that, or the allocation having lost the node, is a loss.
        So is a step killed by a signal (exit 128+N) while Slurm ends the job: `scancel`, a time
        limit or a preemption signals every step at once, and this step's srun may exit before
        gpupack's own signal arrives."""
        if name not in self._steps:
            return None
        log, offset, nodes = self._steps[name]
        try:
            with open(log, "rb") as f:
                f.seek(max(offset, f.seek(0, os.SEEK_END) - 65536))  # srun's last words
                failed = node_failures(f.read().decode(errors="replace"))
        except OSError:
            failed = set()
        lost = self.lost_nodes(bool(failed)) if self.lost_nodes is not None else {}
        for node in nodes:
            if node in lost:
                return f"node {node} {lost[node]}"
        if failed:
            return f"node failure on {', '.join(sorted(failed))} (srun)"
        killed = code is None or code >= 128 or code < 0
        if killed and self._ending is None and self.job_ending is not None:
            self._ending = self.job_ending()
        if killed and self._ending is not None:
            return f"Slurm is ending the job ({self._ending})"
        return None

    def allocation_ending(self) -> str | None:
        return self._ending

    def may_launch(self, now: float) -> bool:
        for name, (log, offset, since) in list(self._watched.items()):
            try:
                with open(log, "rb") as f:
                    f.seek(offset)
                    text = f.read(65536)
            except OSError:
                text = b""
            self._watched[name] = (log, offset + len(text), since)
            self.throttle.observe(name, text.decode(errors="replace"))
            if now - since > self.WATCH_S and name not in self.throttle.waiting:
                del self._watched[name]
        return self.throttle.may_launch(now)

    def ended(self, name: str) -> None:
        self._watched.pop(name, None)
        self._steps.pop(name, None)
        self.throttle.ended(name)
