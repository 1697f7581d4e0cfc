"""GPU inventory and live readings behind one small protocol.

NvmlProbe reads real GPUs through nvidia-ml-py; every NVML call of gpupack lives here. It never
creates a CUDA context (NVML does not), uses the v2 memory query where the driver has it (v1
counts reserved memory as free), and attributes per-process memory to experiments through the
attempt identity (GPUPACK_RUN_DIR, GPUPACK_EXPERIMENT, GPUPACK_ATTEMPT) in /proc/<pid>/environ,
which works for local children and for srun steps alike. SimulatedProbe stands in for the hardware: used memory = the budgets of the
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
from .procs import identity

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


class NvmlError(Exception):
    """NVML cannot give gpupack the GPUs it should see; the message is one line naming the cause."""


# Readings of a GPU that fail this many ticks in a row (fallen off the bus, Xid) make it
# unavailable: nothing new is placed there until it answers again.
FAILED_READINGS_BEFORE_UNAVAILABLE = 3


@dataclass
class _Device:
    handle: Any
    tokens: tuple[str, ...]  # what CUDA_VISIBLE_DEVICES may say to select it
    uuid: str
    mig: bool = False


class NvmlProbe:
    """Real GPUs through nvidia-ml-py (module `pynvml`).

    Errors are caught per device: a GPU that fails while the inventory is taken is left out and
    named in `problems` (callers decide whether that is fatal: inside a Slurm allocation it is);
    a GPU whose readings fail several ticks in a row is reported unavailable. MIG instances
    (a GPU in MIG mode, `MIG-<uuid>` in CUDA_VISIBLE_DEVICES) are GPUs of their own size."""

    def __init__(self, node: str, nvml: Any = None, env: Mapping[str, str] | None = None):
        if nvml is None:
            import pynvml  # nvidia-ml-py

            nvml = pynvml
        self._nvml = nvml
        self._node = node
        self.problems: list[str] = []
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise NvmlError(f"NVML does not start ({_short(exc)})") from None
        env = os.environ if env is None else env
        visible = _visible_filter(env)
        devices: list[_Device] = []
        for nvml_index in range(count):
            try:
                devices.extend(self._devices(nvml_index))
            except nvml.NVMLError as exc:
                self.problems.append(f"GPU {nvml_index} fails in NVML ({_short(exc)})")
        self._handles: list[Any] = []
        self._gpus: list[GpuInfo] = []
        if visible is None:
            chosen = [(d, d.tokens[0]) for d in devices]
        else:
            # The allocation's GPUs (Slurm sets CUDA_VISIBLE_DEVICES for the job) by index or UUID.
            chosen = []
            for token in visible:
                match = next((d for d in devices if _selects(token, d)), None)
                if match is None:
                    self.problems.append(f"CUDA_VISIBLE_DEVICES names {token}, which NVML does not list")
                elif all(d is not match for d, _ in chosen):
                    chosen.append((match, token))
            order = {id(d): i for i, d in enumerate(devices)}
            chosen.sort(key=lambda pair: order[id(pair[0])])  # NVML (PCI bus) order, as before
        for device, cuda_id in chosen:
            try:
                total = int(self._memory_info(device.handle).total)
                name = _text(nvml.nvmlDeviceGetName(device.handle))
            except nvml.NVMLError as exc:
                self.problems.append(f"GPU {device.uuid} fails in NVML ({_short(exc)})")
                continue
            self._handles.append(device.handle)
            self._gpus.append(GpuInfo(node, len(self._gpus), total, name, device.uuid, cuda_id))
        self._failures = [0] * len(self._gpus)
        self._last_error = [""] * len(self._gpus)
        self._run_dir: str | None = None
        self._attempts: dict[str, str] = {}

    def _devices(self, nvml_index: int) -> list[_Device]:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
        except (nvml.NVMLError, AttributeError):  # NotSupported: not a MIG-capable GPU
            current = 0
        if current != getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1):
            return [_Device(handle, (str(nvml_index), uuid), uuid)]
        migs = []
        for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
            except nvml.NVMLError_NotFound:
                continue  # an empty slot
            mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
            migs.append(_Device(mig, (mig_uuid,), mig_uuid, mig=True))
        return migs

    def inventory(self) -> list[GpuInfo]:
        return list(self._gpus)

    def track(self, run_dir: str, attempts: Mapping[str, int]) -> None:
        """Whose memory is whose: a process counts for experiment X only when its environment
        names this run directory and X's current attempt (two runs on one node may use the same
        experiment names)."""
        self._run_dir = run_dir
        self._attempts = {name: str(n) for name, n in attempts.items()}

    def _memory_info(self, handle: Any) -> Any:
        """v2 first (it does not count reserved memory as free); raises NVMLError."""
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        except (TypeError, AttributeError, nvml.NVMLError):
            return nvml.nvmlDeviceGetMemoryInfo(handle)

    def _util(self, handle: Any) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except self._nvml.NVMLError:
            return None  # also MIG instances, which have no utilization of their own

    def _processes(self, handle: Any) -> list[Any] | None:
        try:
            return list(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except self._nvml.NVMLError:
            return None

    def read(self, running: Mapping[str, Occupant]) -> Reading:
        snaps: list[GpuSnapshot] = []
        usage: dict[str, dict[GpuKey, int]] = {}
        for i, (info, handle) in enumerate(zip(self._gpus, self._handles)):
            free: int | None = None
            try:
                free = int(self._memory_info(handle).free)
                self._failures[i] = 0
            except self._nvml.NVMLError as exc:
                self._failures[i] += 1
                self._last_error[i] = _short(exc)
            unavailable = ""
            if self._failures[i] >= FAILED_READINGS_BEFORE_UNAVAILABLE:
                unavailable = f"NVML readings failing ({self._last_error[i]})"
            snaps.append(GpuSnapshot(info.node, info.index, info.total_bytes, free, self._util(handle), info.uuid, unavailable))
            for proc in self._processes(handle) or []:
                used = getattr(proc, "usedGpuMemory", None)
                if not isinstance(used, int):  # NVML reports "not available" as None
                    continue
                name = self._owner(int(proc.pid))
                if name is None:
                    continue
                per_gpu = usage.setdefault(name, {})
                per_gpu[info.key] = per_gpu.get(info.key, 0) + used
        return Reading(tuple(snaps), usage)

    def _owner(self, pid: int) -> str | None:
        """The experiment whose current attempt of this run `pid` belongs to (see `track`);
        before `track` is called, any process naming an experiment counts for it."""
        ident = identity(pid)
        if ident is None:
            return None
        if self._run_dir is None:
            return ident.experiment
        if ident.run_dir != self._run_dir or self._attempts.get(ident.experiment) != ident.attempt:
            return None
        return ident.experiment

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # shutting down a library that failed is not worth failing the run
            pass


def node_gpus(inventory: Sequence[GpuInfo]) -> int | None:
    """The GPU count of the largest node: what a `nodes: K` experiment takes on each node."""
    counts = Counter(g.node for g in inventory)
    return max(counts.values()) if counts else None


def _selects(token: str, device: _Device) -> bool:
    """CUDA_VISIBLE_DEVICES token -> device: an index, or a (prefix of a) GPU-/MIG- UUID."""
    if token.startswith(("GPU-", "MIG-")):
        return device.uuid.startswith(token)
    return not device.mig and token in device.tokens


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_probe(
    spec: str | None, node: str, env: Mapping[str, str], fallback: str = "4x80GB", allocation_gpus: int = 0,
    names: Sequence[str] = (),
) -> tuple[GpuProbe, str | None]:
    """The probe to use and a one-line warning, if any. `spec` (--gpus / GPUPACK_GPUS) forces
    simulated GPUs; several simulated nodes take `names` (the allocation's nodes) where there are
    enough. Outside an allocation, NVML finding no GPU means simulated `fallback` GPUs,
    with a warning. Inside a Slurm allocation that holds GPUs (`allocation_gpus`), simulating
    would launch real jobs onto made-up GPUs: any NVML failure raises NvmlError instead."""
    spec = spec or env.get("GPUPACK_GPUS") or None
    if spec:
        return SimulatedProbe(parse_gpu_spec(spec, node, names)), None
    why = "NVML found no GPU"
    try:
        probe = NvmlProbe(node, env=env)
    except NvmlError as exc:
        probe, why = None, str(exc)
    except Exception as exc:  # no nvidia-ml-py at all, or a library that fails to load
        probe, why = None, f"NVML does not start ({_short(exc)})"
    if probe is not None and probe.problems:
        why = "; ".join(probe.problems)
    if allocation_gpus and (probe is None or probe.problems or not probe.inventory()):
        if probe is not None:
            probe.close()
        raise NvmlError(
            f"{why} on {node}, inside a Slurm allocation with {allocation_gpus} GPU(s): gpupack will not "
            "simulate them; fix NVML there, or pass --gpus SPEC to run on simulated GPUs on purpose"
        )
    if probe is not None and probe.inventory():
        return probe, (f"{why}; using the other GPUs" if probe.problems else None)
    if probe is not None:
        probe.close()
    return SimulatedProbe(parse_gpu_spec(fallback, node, names)), f"{why}; using simulated GPUs {fallback} (set --gpus to choose)"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
