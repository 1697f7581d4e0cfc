"""GPU inventory and live readings behind one small protocol.

NvmlProbe reads real GPUs through nvidia-ml-py; every NVML call of gpupack lives here. It never
creates a CUDA context (NVML does not), uses the v2 memory query where the driver has it (v1
counts reserved memory as free), and attributes per-process memory to experiments through the
GPUPACK_EXPERIMENT variable in /proc/<pid>/environ, which works for local children and for srun
steps alike. SimulatedProbe stands in for the hardware: used memory = the budgets of the
experiments running on it.

A reading that failed is None, never 0: the policy then assumes the worst.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .policy import GpuKey, GpuSnapshot, Occupant

# One part of a --gpus spec: [NODES x] [GPUS x] SIZE [unit]; x may also be X or *.
_SPEC = re.compile(r"^\s*(?:(\d+)\s*[xX*]\s*)??(?:(\d+)\s*[xX*]\s*)?(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*$")
SPEC_GRAMMAR = (
    "NODESxGPUSxSIZE (2x4x80GB: 2 nodes of 4 x 80 GB), GPUSxSIZE (4x80GB: one node), sizes of one "
    "node mixed with ',' (2x40GB,2x80GB), nodes of different kinds joined with '+' (2x4x80GB+2x40GB)"
)

class GpuSpecError(ValueError):
    pass


@dataclass(frozen=True)
class GpuInfo:
    """A GPU of the inventory; `cuda_id` is what CUDA_VISIBLE_DEVICES must say to select it."""

    node: str
    index: int
    total_bytes: int
    name: str
    uuid: str
    cuda_id: str

    @property
    def key(self) -> GpuKey:
        return (self.node, self.index)


@dataclass(frozen=True)
class Reading:
    """One consistent reading per tick."""

    gpus: tuple[GpuSnapshot, ...]
    # experiment name -> GPU -> bytes it uses now (attributed per process)
    usage: Mapping[str, Mapping[GpuKey, int]] = field(default_factory=dict)


class GpuProbe(Protocol):
    def inventory(self) -> list[GpuInfo]: ...

    def read(self, running: Mapping[str, Occupant]) -> Reading: ...


def parse_gpu_spec(spec: str, node: str, names: Sequence[str] = ()) -> list[GpuInfo]:
    """The simulated GPUs a --gpus spec describes (SPEC_GRAMMAR; GB means 10^9 bytes).

    '4x80GB' is four 80 GB GPUs on one node, named `node`; '2x4x80GB' is 2 nodes of 4, and
    '4x80GB+2x40GB' a node of 4 x 80 GB and one of 2 x 40 GB. Several nodes are named `names`
    where it has enough of them, else n1, n2, ... in the order written; each node counts its
    GPUs from 0, as CUDA_VISIBLE_DEVICES does on a real node."""
    bad = f"--gpus: bad GPU spec '{spec}' (expected {SPEC_GRAMMAR})"
    nodes: list[list[tuple[int, str]]] = []  # per node: (bytes, label) of each GPU
    for group in spec.split("+"):
        parts = [_SPEC.match(part) for part in group.split(",")]
        if not all(parts):
            raise GpuSpecError(bad)
        matches = [m for m in parts if m]
        if any(m.group(1) for m in matches) and len(matches) > 1:
            raise GpuSpecError(f"{bad}: NODESx... can't be mixed with ',' (join kinds of node with '+')")
        count_nodes = int(matches[0].group(1) or 1)
        gpus: list[tuple[int, str]] = []
        for m in matches:
            count, size, unit = int(m.group(2) or 1), float(m.group(3)), m.group(4) or "GB"
            total = int(size * (2**30 if unit == "GiB" else 10**9))
            if count < 1 or count > 1024 or total <= 0:
                raise GpuSpecError(f"--gpus: bad GPU spec '{spec}' (1-1024 GPUs per node, size above 0)")
            gpus += [(total, f"simulated-{size:g}{unit}")] * count
        if count_nodes < 1 or len(nodes) + count_nodes > 1024 or len(gpus) > 1024:
            raise GpuSpecError(f"--gpus: bad GPU spec '{spec}' (1-1024 nodes of 1-1024 GPUs)")
        nodes += [gpus] * count_nodes
    if len(nodes) == 1:
        node_names = [node]
    elif len(names) >= len(nodes):
        node_names = list(names[: len(nodes)])
    else:
        node_names = [f"n{i + 1}" for i in range(len(nodes))]
    return [
        GpuInfo(name, i, total, label, f"SIM-{name}-{i}", str(i))
        for name, gpus in zip(node_names, nodes)
        for i, (total, label) in enumerate(gpus)
    ]

class SimulatedProbe:
    """Simulated GPUs: a running experiment uses exactly its budget (the whole GPU if unknown)
    and its declared share of compute (util)."""

    def __init__(self, gpus: Sequence[GpuInfo]):
        self._gpus = list(gpus)

    def inventory(self) -> list[GpuInfo]:
        return list(self._gpus)

    def read(self, running: Mapping[str, Occupant]) -> Reading:
        used: dict[GpuKey, int] = {g.key: 0 for g in self._gpus}
        total = {g.key: g.total_bytes for g in self._gpus}
        usage: dict[str, dict[GpuKey, int]] = {}
        for name, occ in running.items():
            for key in occ.gpus:
                if key not in used:
                    continue
                amount = occ.budget_bytes if occ.budget_bytes is not None else total[key]
                amount = min(amount, total[key] - used[key])
                used[key] += amount
                usage.setdefault(name, {})[key] = amount
        # Utilization: the occupants' declared shares (util), capped at the whole GPU.
        load: dict[GpuKey, float] = {}
        for occ in running.values():
            for key in occ.gpus:
                load[key] = load.get(key, 0.0) + occ.util
        snaps = tuple(
            GpuSnapshot(
                g.node, g.index, g.total_bytes, g.total_bytes - used[g.key], 100.0 * min(1.0, load.get(g.key, 0.0)), g.uuid
            )
            for g in self._gpus
        )
        return Reading(snaps, usage)


def _visible_filter(env: Mapping[str, str]) -> list[str] | None:
    """The devices this process may use, as CUDA_VISIBLE_DEVICES lists them (None = all)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _experiment_of(pid: int) -> str | None:
    """GPUPACK_EXPERIMENT from a process's environment; None if unreadable or not ours."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for item in data.split(b"\0"):
        if item.startswith(b"GPUPACK_EXPERIMENT="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None


class NvmlProbe:
    """Real GPUs through nvidia-ml-py (module `pynvml`)."""

    def __init__(self, node: str, nvml: Any = None, env: Mapping[str, str] | None = None):
        if nvml is None:
            import pynvml  # nvidia-ml-py

            nvml = pynvml
        self._nvml = nvml
        self._node = node
        nvml.nvmlInit()
        env = os.environ if env is None else env
        visible = _visible_filter(env)
        self._handles: list[Any] = []
        self._gpus: list[GpuInfo] = []
        for nvml_index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            if visible is not None:
                # The allocation's GPUs (Slurm sets CUDA_VISIBLE_DEVICES for the job) by index or UUID.
                tokens = [t for t in visible if t == str(nvml_index) or (t.startswith("GPU-") and uuid.startswith(t))]
                if not tokens:
                    continue
                cuda_id = tokens[0]
            else:
                cuda_id = str(nvml_index)
            total = self._memory(handle)[0]
            self._handles.append(handle)
            self._gpus.append(
                GpuInfo(node, len(self._gpus), total or 0, _text(nvml.nvmlDeviceGetName(handle)), uuid, cuda_id)
            )

    def inventory(self) -> list[GpuInfo]:
        return list(self._gpus)

    def _memory(self, handle: Any) -> tuple[int | None, int | None]:
        """(total, free) bytes; v2 first (it does not count reserved memory as free)."""
        nvml = self._nvml
        try:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except (TypeError, AttributeError, nvml.NVMLError):
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.total), int(info.free)
        except nvml.NVMLError:
            return None, None

    def _util(self, handle: Any) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError:
            return None

    def _processes(self, handle: Any) -> list[Any] | None:
        try:
            return list(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except self._nvml.NVMLError:
            return None

    def read(self, running: Mapping[str, Occupant]) -> Reading:
        snaps: list[GpuSnapshot] = []
        usage: dict[str, dict[GpuKey, int]] = {}
        for info, handle in zip(self._gpus, self._handles):
            _total, free = self._memory(handle)
            snaps.append(GpuSnapshot(info.node, info.index, info.total_bytes, free, self._util(handle), info.uuid))
            for proc in self._processes(handle) or []:
                used = getattr(proc, "usedGpuMemory", None)
                if not isinstance(used, int):  # NVML reports "not available" as None
                    continue
                name = _experiment_of(int(proc.pid))
                if name is None:
                    continue
                per_gpu = usage.setdefault(name, {})
                per_gpu[info.key] = per_gpu.get(info.key, 0) + used
        return Reading(tuple(snaps), usage)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a library that failed is not worth failing the run
            pass


def node_gpus(inventory: Sequence[GpuInfo]) -> int | None:
    """The GPU count of the largest node: what a `nodes: K` experiment takes on each node."""
    counts = Counter(g.node for g in inventory)
    return max(counts.values()) if counts else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_probe(
    spec: str | None, node: str, env: Mapping[str, str], fallback: str = "4x80GB", names: Sequence[str] = ()
) -> tuple[GpuProbe, str | None]:
    """The probe to use and, when NVML was wanted but gave nothing, the one-line reason why
    simulated GPUs (`fallback`) are used instead. `spec` (--gpus / GPUPACK_GPUS) forces them;
    simulated nodes take `names` (the allocation's nodes) where there are enough."""
    spec = spec or env.get("GPUPACK_GPUS") or None
    if spec:
        return SimulatedProbe(parse_gpu_spec(spec, node, names)), None
    why = "NVML found no GPU"
    try:
        probe = NvmlProbe(node, env=env)
        if probe.inventory():
            return probe, None
        probe.close()
    except Exception as exc:  # NVML missing, no driver, no permission: all mean "no GPU here"
        why = f"NVML found no GPU ({_short(exc)})"
    return SimulatedProbe(parse_gpu_spec(fallback, node, names)), f"{why}; using simulated GPUs {fallback} (set --gpus to choose)"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
