"""backend.py: the one choice between running on this machine and inside a Slurm allocation, and
what each gives `gpupack run`. The Slurm side's commands run for real in test_slurm_cluster.py."""

from __future__ import annotations

from gpupack.backend import LocalBackend, SlurmBackend, backend_for
from gpupack.gpus import SimulatedProbe
from gpupack.launch import LocalLauncher
from gpupack.slurm import Allocation
from gpupack.srun import SrunLauncher


def test_outside_slurm_the_run_is_local() -> None:
    backend = backend_for({"HOME": "/root"})
    assert isinstance(backend, LocalBackend) and backend.job_id is None
    probe, notes = backend.probe("2x40GB", "/tmp/run", 1.0)
    assert isinstance(probe, SimulatedProbe) and len(probe.inventory()) == 2 and notes == []
    assert type(backend.launcher(None)) is LocalLauncher
    hooks = backend.hooks(10, ())
    assert hooks.job_id is None and hooks.time_left(0.0) is None and hooks.retry_failed


def test_inside_an_allocation_the_run_is_slurms() -> None:
    allocation = Allocation("42", ("n1",), (0, 1), (8,), restart_count=1, batch_node="n1")
    backend = SlurmBackend(allocation, {"SLURMD_NODENAME": "n1"})
    assert backend.job_id == "42"
    probe, _ = backend.probe("2x40GB", "/tmp/run", 1.0)
    assert [g.node for g in probe.inventory()] == ["n1", "n1"]
    launcher = backend.launcher("overlap")  # given: no `scontrol show config`
    assert isinstance(launcher, SrunLauncher) and launcher.mode == "overlap" and launcher.here == "n1"
    assert launcher.node_gpus == {"n1": 2}
    hooks = backend.hooks(10, ["m.yaml"])
    assert hooks.job_id == "42" and hooks.cpus_per_node == {"n1": 8}
    assert not hooks.retry_failed  # a requeued job does not try its failures again
    backend.close()
