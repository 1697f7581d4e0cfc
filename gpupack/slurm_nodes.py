"""The nodes of a multi-node allocation, as Slurm 22.05 reports them (slurm/README.md, "Several
nodes"):

- `reader_argv()`: the step that reads a node's GPUs (gpupack._reader), pure. `--overlap`, so it
  runs beside the experiments' steps and takes nothing from them; it holds every GPU the job
  has there, as the batch step does on its own node, so its CUDA_VISIBLE_DEVICES names them.
- `srun_env()`: an srun client's environment without the job's SLURM_GPUS.
- `NodeWatch`: which nodes the allocation has lost. A node set down (or whose slurmd stopped
  answering for SlurmdTimeout) while steps run there is removed from the job when it was submitted with
  `--no-kill` (parallel.slurm is): its steps end, and their srun clients print
  `srun: error: Node failure on n2` but exit 0, so an exit code alone would call a lost
  experiment a success. The job's NodeList shrinks for good (with ReturnToService the node may
  be back to idle a moment later, but no longer ours), which is what `NodeWatch` checks.
- `node_address()`: a node's NodeAddr (MASTER_ADDR of a multi-node experiment), else its name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .slurm import Runner, ask, expand_nodelist, parse_scontrol, run_command, show_job

_NODE_FAILURE = re.compile(r"srun: error: Node failure on (\S+)")


def node_failures(text: str) -> set[str]:
    """Nodes that srun's stderr says failed under a step."""
    return {m[1] for m in _NODE_FAILURE.finditer(text)}


def reader_argv(
    node: str, python: str, every_s: float, run_dir: str, gpus: str | None = None, node_gpus: int | None = None,
    nodes: Sequence[str] = (),
) -> list[str]:
    """The reader step on `node`: JSON lines on its stdout (gpupack._reader). `node_gpus`: the
    job's GPU count there; the step holds them all (`--overlap`, so do the experiments' steps),
    which sets its CUDA_VISIBLE_DEVICES to them. None: Slurm's default, all of them, which
    fails in a job asked with `--gpus=N` (the step would ask for N on one node). `--gpus=k`
    rather than `--gres=gpu:k`, which 22.05 refuses on the larger node of such a job."""
    gres = [] if node_gpus is None else ["--gres=none" if node_gpus == 0 else f"--gpus={node_gpus}"]
    argv = [
        "srun", "--overlap", "-N1", "-n1", f"--nodelist={node}", "--job-name=gpupack-reader", *gres,
        "--mem=0", "--export=ALL", python, "-m", "gpupack._reader", "--node", node, "--every", f"{every_s:g}",
        "--run-dir", run_dir,
    ]
    return argv + (["--gpus", gpus, "--nodes", ",".join(nodes)] if gpus else [])


def srun_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment for an srun client inside the job. Without SLURM_GPUS: in a job asked
    with `--gpus=N`, srun reads it as its own `--gpus=N`, and every step that names its GPUs
    (`--gpus=k`, `--gres=gpu:k`) fails: "Invalid generic resource (gres) specification"."""
    return {k: v for k, v in env.items() if k != "SLURM_GPUS"}


def show_node(node: str, *, run: Runner = run_command) -> dict[str, str]:
    """`scontrol show node N` as a dict; Reason= takes the rest of its line."""
    return parse_scontrol(ask(run, ["scontrol", "show", "node", node]) or "", ("Reason",))


def node_address(node: str, *, run: Runner = run_command) -> str:
    addr = show_node(node, run=run).get("NodeAddr", "")
    return addr if addr and addr != "(null)" else node


@dataclass
class NodeWatch:
    """Nodes of job `job_id` that are lost, with a short reason each ("left the allocation
    (idle: test)"); once lost, always lost.

    `lost(now)` asks Slurm at most every `every_s`; `lost(now, force=True)` asks now (a reader
    ended, a step printed "Node failure"). A failed query changes nothing."""

    job_id: str
    nodes: Sequence[str]
    run: Runner = run_command
    every_s: float = 5.0
    _lost: dict[str, str] = field(default_factory=dict, init=False)
    _asked_at: float | None = field(default=None, init=False)

    def lost(self, now: float, force: bool = False) -> Mapping[str, str]:
        if force or self._asked_at is None or now - self._asked_at >= self.every_s:
            self._asked_at = now
            self._check()
        return self._lost

    def _check(self) -> None:
        info = show_job(self.job_id, run=self.run)
        if not info or not info.get("NodeList"):
            return  # Slurm did not answer: nothing is known to be lost
        current = set(expand_nodelist(info["NodeList"], run=self.run))
        if not current:
            return
        for node in self.nodes:
            if node in current or node in self._lost:
                continue
            state = show_node(node, run=self.run)
            reason = state.get("Reason", "").split(" [")[0]  # "test [root@2026-12-03T07:55:11]"
            what = f"{state.get('State', 'gone').lower()}" + (f": {reason}" if reason and reason != "(null)" else "")
            self._lost[node] = f"left the allocation ({what})"
