"""gpus.py: NvmlProbe against nvidia-ml-py's real module with its device functions replaced (no
GPU on the test machines), SimulatedProbe, and the fallback when NVML finds nothing."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pynvml
import pytest

from gpupack.gpus import NvmlProbe, SimulatedProbe, open_probe, parse_gpu_spec, GpuSpecError
from gpupack.policy import Occupant

GB = 10**9


class FakeDriver:
    """Two H100s as NVML would describe them; records which memory API version was asked."""

    def __init__(self, processes: dict[int, list[SimpleNamespace]] | None = None, v2: bool = True):
        self.processes = processes or {}
        self.v2 = v2
        self.versions: list[object] = []
        self.inits = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pynvml, "nvmlInit", self.init)
        monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"h{i}")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: f"GPU-{h[1]}aaa-bbbb")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: b"NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", self.memory)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=70 if h == "h0" else 0))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: self.processes.get(int(h[1]), []))

    def init(self) -> None:
        self.inits += 1

    def memory(self, handle: str, version: object = None) -> SimpleNamespace:
        self.versions.append(version)
        if version is not None and not self.v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        # v2 does not count the driver's reserved memory as free; v1 does (it looks freer)
        free = 50 * GB if version is not None else 51 * GB
        return SimpleNamespace(total=80 * GB, free=free, used=80 * GB - free)


def test_nvml_probe_reads_v2_memory_util_and_attributes_processes(monkeypatch):
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, "GPUPACK_EXPERIMENT": "train-s1"})
    try:
        driver = FakeDriver({0: [SimpleNamespace(pid=child.pid, usedGpuMemory=12 * GB),
                                 SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)]})
        driver.install(monkeypatch)
        probe = NvmlProbe("n1", nvml=pynvml, env={})
        inv = probe.inventory()
        assert [(g.node, g.index, g.cuda_id, g.total_bytes) for g in inv] == [("n1", 0, "0", 80 * GB), ("n1", 1, "1", 80 * GB)]
        assert inv[0].name == "NVIDIA H100 80GB HBM3" and inv[0].uuid.startswith("GPU-0")
        reading = probe.read({})
        assert reading.gpus[0].free_bytes == 50 * GB  # the v2 figure
        assert pynvml.nvmlMemory_v2 in driver.versions
        assert reading.gpus[0].util_percent == 70.0
        # the sleep child is attributed through its environment; an unknown amount (None) is skipped
        assert reading.usage == {"train-s1": {("n1", 0): 12 * GB}}
    finally:
        child.kill()
        child.wait()


def test_nvml_probe_falls_back_to_v1_memory_where_v2_is_missing(monkeypatch):
    driver = FakeDriver(v2=False)
    driver.install(monkeypatch)
    probe = NvmlProbe("n1", nvml=pynvml, env={})
    assert probe.read({}).gpus[1].free_bytes == 51 * GB


def test_nvml_probe_keeps_only_the_allocations_gpus(monkeypatch):
    FakeDriver().install(monkeypatch)
    probe = NvmlProbe("n1", nvml=pynvml, env={"CUDA_VISIBLE_DEVICES": "1"})
    inv = probe.inventory()
    assert [(g.index, g.cuda_id) for g in inv] == [(0, "1")]
    by_uuid = NvmlProbe("n1", nvml=pynvml, env={"CUDA_VISIBLE_DEVICES": "GPU-1aaa"}).inventory()
    assert [g.cuda_id for g in by_uuid] == ["GPU-1aaa"]


def test_failed_reading_is_unknown_not_zero(monkeypatch):
    driver = FakeDriver()
    driver.install(monkeypatch)
    probe = NvmlProbe("n1", nvml=pynvml, env={})

    def broken(handle, version=None):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", broken)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: (_ for _ in ()).throw(pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)))
    snap = probe.read({}).gpus[0]
    assert snap.free_bytes is None and snap.util_percent is None


def test_no_nvml_means_simulated_gpus_with_one_line(monkeypatch):
    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    probe, note = open_probe(None, "n1", {})
    assert isinstance(probe, SimulatedProbe) and len(probe.inventory()) == 4
    assert note is not None and "NVML found no GPU" in note and "\n" not in note


def test_spec_forces_simulation_and_is_validated():
    probe, note = open_probe("2x40GB,1x80GB", "n1", {})
    assert note is None
    assert [g.total_bytes for g in probe.inventory()] == [40 * GB, 40 * GB, 80 * GB]
    probe, _ = open_probe(None, "n1", {"GPUPACK_GPUS": "1x24GiB"})
    assert probe.inventory()[0].total_bytes == 24 * 2**30
    with pytest.raises(GpuSpecError):
        parse_gpu_spec("four big ones", "n1")


def test_simulated_usage_is_the_budgets_of_running_experiments():
    probe = SimulatedProbe(parse_gpu_spec("2x80GB", "n1"))
    reading = probe.read(
        {
            "a": Occupant("a", (("n1", 0),), 30 * GB),
            "b": Occupant("b", (("n1", 0), ("n1", 1)), 20 * GB),
            "whole": Occupant("whole", (("n1", 1),), None),
        }
    )
    # gpu0: 30 + 20 used; gpu1: 20 + the rest (a budget of None holds the whole GPU)
    assert [g.free_bytes for g in reading.gpus] == [30 * GB, 0]
    assert reading.usage["b"] == {("n1", 0): 20 * GB, ("n1", 1): 20 * GB}
    assert reading.usage["whole"] == {("n1", 1): 60 * GB}
    # utilization: the declared shares, capped at 100%
    light = probe.read({"a": Occupant("a", (("n1", 0),), 30 * GB, util=0.3), "b": Occupant("b", (("n1", 1),), 30 * GB)})
    assert [g.util_percent for g in light.gpus] == [30.0, 100.0]


@pytest.mark.parametrize(
    "spec, nodes",
    [
        ("4x80GB", {"vm": [80, 80, 80, 80]}),  # one node, named by the caller
        ("1x2x80GB", {"vm": [80, 80]}),
        ("2x40GB,1x80GB", {"vm": [40, 40, 80]}),
        ("2x2x80GB", {"n1": [80, 80], "n2": [80, 80]}),
        ("2x80GB+1x40GB", {"n1": [80, 80], "n2": [40]}),
        ("2X1x80GB + 3*40", {"n1": [80], "n2": [80], "n3": [40, 40, 40]}),
    ],
)
def test_gpu_spec_nodes_x_gpus_x_size(spec: str, nodes: dict[str, list[int]]) -> None:
    found: dict[str, list[int]] = {}
    for g in parse_gpu_spec(spec, "vm"):
        assert g.index == len(found.get(g.node, [])) and g.cuda_id == str(g.index)  # counted per node
        found.setdefault(g.node, []).append(g.total_bytes // GB)
    assert found == nodes


def test_gpu_spec_names_simulated_nodes_after_the_allocation_and_refuses_bad_forms() -> None:
    assert [g.node for g in parse_gpu_spec("2x1x80GB", "a", ["a", "b"])] == ["a", "b"]
    assert [g.node for g in parse_gpu_spec("3x1x80GB", "a", ["a", "b"])] == ["n1", "n2", "n3"]  # too few names
    for bad in ("2x4x80GB,2x40GB", "0x4x80GB", "2x0x80GB", "2x2x2x80GB", "4x80GB+", "2000x1x80GB"):
        with pytest.raises(GpuSpecError, match="--gpus: bad GPU spec"):
            parse_gpu_spec(bad, "n")
