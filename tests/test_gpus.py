"""gpus.py: NvmlProbe against nvidia-ml-py's real module with its device functions replaced (no
GPU on the test machines), SimulatedProbe, and the fallback when NVML finds nothing."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pynvml
import pytest
from conftest import spawned

from gpupack.gpus import GpuSpecError, NvmlError, NvmlProbe, SimulatedProbe, open_probe, parse_gpu_spec
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
    ident = {"GPUPACK_RUN_DIR": "/runs/r", "GPUPACK_EXPERIMENT": "train-s1", "GPUPACK_ATTEMPT": "1"}
    child = spawned(["sleep", "30"], {**os.environ, **ident})
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
    assert note is not None and note.startswith("NVML does not start (NVML Shared Library Not Found)") and "\n" not in note


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


# --- an NVML double on nvidia-ml-py's own error classes: failures, MIG, attribution ---------------


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # nvidia-ml-py maps the code to its own subclass (NVMLError_GpuIsLost ...)


class Nvml:
    """A module-like NVML: pynvml's error classes and constants, devices described by dicts
    {uuid, total, free, mig: [{uuid, total, free}], fail: {function name: error code}}."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(self, devices: list[dict], init_error: int | None = None, processes: dict | None = None):
        self.devices = devices
        self.init_error = init_error
        self.processes = processes or {}

    def _fail(self, handle: dict, fn: str) -> None:
        code = handle.get("fail", {}).get(fn)
        if code is not None:
            raise nvml_error(code)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict:
        self._fail(self.devices[i], "handle")
        return self.devices[i]

    def nvmlDeviceGetUUID(self, h: dict) -> str:
        self._fail(h, "uuid")
        return h["uuid"]

    def nvmlDeviceGetName(self, h: dict) -> str:
        return h.get("name", "NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetMemoryInfo(self, h: dict, version: object = None) -> SimpleNamespace:
        self._fail(h, "memory")
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetUtilizationRates(self, h: dict) -> SimpleNamespace:
        if "mig" in h or h["uuid"].startswith("MIG-"):
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=10)

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict) -> list:
        return self.processes.get(h["uuid"], [])

    def nvmlDeviceGetMigMode(self, h: dict) -> list[int]:
        if "mig" not in h:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [pynvml.NVML_DEVICE_MIG_ENABLE, pynvml.NVML_DEVICE_MIG_ENABLE]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict, j: int) -> dict:
        if j >= len(h["mig"]) or h["mig"][j] is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return h["mig"][j]


def h100(i: int, **extra) -> dict:
    return {"uuid": f"GPU-{i}aaa-bbbb", "total": 80 * GB, "free": 80 * GB, **extra}


def test_a_device_that_fails_during_the_inventory_is_left_out_and_named():
    lost = h100(1, fail={"uuid": pynvml.NVML_ERROR_GPU_IS_LOST})
    probe = NvmlProbe("n1", nvml=Nvml([h100(0), lost, h100(2)]), env={})
    assert [g.uuid for g in probe.inventory()] == ["GPU-0aaa-bbbb", "GPU-2aaa-bbbb"]
    assert [g.index for g in probe.inventory()] == [0, 1]
    assert probe.problems == ["GPU 1 fails in NVML (GPU is lost)"]
    # outside an allocation: the GPUs that work, with a warning; inside one: an error
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pynvml, "nvmlInit", lambda: None)
        for name in ("nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
                     "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMigMode"):
            mp.setattr(pynvml, name, getattr(Nvml([h100(0), lost]), name))
        probe2, note = open_probe(None, "n1", {})
        assert [g.uuid for g in probe2.inventory()] == ["GPU-0aaa-bbbb"]
        assert note == "GPU 1 fails in NVML (GPU is lost); using the other GPUs"
        with pytest.raises(NvmlError, match=r"^GPU 1 fails in NVML \(GPU is lost\) on n1, inside a Slurm allocation"):
            open_probe(None, "n1", {}, allocation_gpus=2)


def test_nvml_failing_inside_an_allocation_with_gpus_is_an_error_not_simulated_gpus(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(nvml_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)))
    with pytest.raises(NvmlError) as err:
        open_probe(None, "gpu07", {}, "4x80GB", allocation_gpus=4)
    text = str(err.value)
    assert "\n" not in text and text.startswith("NVML does not start (Driver Not Loaded) on gpu07")
    assert "--gpus" in text
    probe, note = open_probe("2x80GB", "gpu07", {}, allocation_gpus=4)  # --gpus: simulated on purpose
    assert isinstance(probe, SimulatedProbe) and note is None
    probe, note = open_probe(None, "laptop", {})  # no allocation: simulated, and said so
    assert isinstance(probe, SimulatedProbe) and note and note.startswith("NVML does not start (Driver Not Loaded)")


def test_run_inside_an_allocation_with_a_broken_nvml_exits_2_naming_nvml(monkeypatch, tmp_path, capsys):
    from gpupack.cli import main

    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: x\nphases: [{name: p, experiments: [{name: a, cmd: 'true', mem: 1GB}]}]\n")
    for var in ("GPUPACK_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu07")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)))
    assert main(["run", str(manifest), "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NVML" in err[0] and "allocation with 4 GPU(s)" in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was created


def test_mig_instances_are_gpus_of_their_own_size():
    mig = h100(0, mig=[{"uuid": "MIG-aaa1", "total": 10 * GB, "free": 9 * GB}, None,
                       {"uuid": "MIG-bbb2", "total": 20 * GB, "free": 20 * GB}])
    nvml = Nvml([mig, h100(1)])
    everything = NvmlProbe("n1", nvml=nvml, env={}).inventory()
    assert [(g.cuda_id, g.total_bytes) for g in everything] == [("MIG-aaa1", 10 * GB), ("MIG-bbb2", 20 * GB), ("1", 80 * GB)]
    probe = NvmlProbe("n1", nvml=nvml, env={"CUDA_VISIBLE_DEVICES": "MIG-bbb2"})
    assert [(g.index, g.cuda_id, g.total_bytes, g.uuid) for g in probe.inventory()] == [(0, "MIG-bbb2", 20 * GB, "MIG-bbb2")]
    assert probe.problems == []
    snap = probe.read({}).gpus[0]
    assert snap.free_bytes == 20 * GB and snap.util_percent is None and not snap.unavailable
    # a MIG UUID that NVML does not list is a problem, not silently nothing
    missing = NvmlProbe("n1", nvml=nvml, env={"CUDA_VISIBLE_DEVICES": "MIG-ccc3"})
    assert missing.inventory() == [] and missing.problems == ["CUDA_VISIBLE_DEVICES names MIG-ccc3, which NVML does not list"]


def test_a_gpu_whose_readings_keep_failing_becomes_unavailable_and_comes_back():
    flaky = h100(1)
    probe = NvmlProbe("n1", nvml=Nvml([h100(0), flaky]), env={})
    flaky["fail"] = {"memory": pynvml.NVML_ERROR_GPU_IS_LOST}
    seen = [probe.read({}).gpus[1] for _ in range(3)]
    assert [s.free_bytes for s in seen] == [None, None, None]
    assert [s.unavailable for s in seen] == ["", "", "NVML readings failing (GPU is lost)"]
    assert probe.read({}).gpus[0].unavailable == ""  # the other GPU is unaffected
    flaky["fail"] = {}
    assert probe.read({}).gpus[1].unavailable == ""


def test_memory_is_attributed_by_run_directory_and_attempt_not_by_name_alone(tmp_path):
    def proc(run_dir: str, attempt: str) -> subprocess.Popen:
        env = {**os.environ, "GPUPACK_RUN_DIR": run_dir, "GPUPACK_EXPERIMENT": "train", "GPUPACK_ATTEMPT": attempt}
        return spawned(["sleep", "30"], env)

    mine, other_run, old_attempt = proc("/runs/a", "2"), proc("/runs/b", "2"), proc("/runs/a", "1")
    try:
        used = {mine.pid: 10, other_run.pid: 20, old_attempt.pid: 40}
        nvml = Nvml([h100(0)], processes={"GPU-0aaa-bbbb": [SimpleNamespace(pid=p, usedGpuMemory=n * GB) for p, n in used.items()]})
        probe = NvmlProbe("n1", nvml=nvml, env={})
        probe.track("/runs/a", {"train": 2})
        assert probe.read({}).usage == {"train": {("n1", 0): 10 * GB}}
    finally:
        for p in (mine, other_run, old_attempt):
            p.kill()
            p.wait()


def test_an_unavailable_gpu_takes_nothing_new_and_its_dashboard_row_says_why(tmp_path):
    import io

    from rich.console import Console

    from gpupack import dashboard
    from gpupack.engine import Engine, RunOptions
    from gpupack.launch import LocalLauncher
    from gpupack.manifest import load_text
    from gpupack.store import Store

    flaky = h100(1)
    probe = NvmlProbe("n0", nvml=Nvml([h100(0), flaky]), env={})
    flaky["fail"] = {"memory": pynvml.NVML_ERROR_GPU_IS_LOST}  # fell off the bus after the inventory
    for _ in range(3):
        probe.read({})
    manifest = load_text(
        "name: u\nphases: [{name: p, experiments: [{name: 'e{i}', grid: {i: [1, 2]}, cmd: 'true', mem: 50GB}]}]\n",
        tmp_path / "m.yaml",
    )
    manifest.run_dir.mkdir(parents=True)
    store = Store(manifest.run_dir / "state.db")
    inventory = probe.inventory()
    engine = Engine(manifest, store, probe, LocalLauncher(), inventory, RunOptions(poll_s=0.05))
    engine.prepare()
    assert engine.run() == 0
    engine.close(0)
    # 50 + 50 GB do not fit one 80 GB GPU, yet both ran on gpu0, one after the other
    assert [a.gpus for a in store.attempts()] == [(0,), (0,)]
    assert any(e.message == "gpu1 unavailable: NVML readings failing (GPU is lost); no new experiments there"
               for e in store.events())
    view = dashboard.build_view(store, 0.0)
    assert [g.unavailable for g in view.gpus] == ["", "NVML readings failing (GPU is lost)"]
    out = io.StringIO()
    Console(file=out, width=200).print(dashboard._gpu_table(view, plain=True))
    row = next(line for line in out.getvalue().splitlines() if line.strip().startswith("gpu1"))
    assert "UNAVAILABLE: NVML readings failing (GPU is lost)" in row
    store.close()
