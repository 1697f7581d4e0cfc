"""Every manifest the project ships loads, and the 24-hour plan fits its 24 hours on 4 x 80 GB."""

from __future__ import annotations

import pytest

from conftest import ROOT
from gpupack.gpus import parse_gpu_spec
from gpupack.manifest import load
from gpupack.simulate import plan_data

SHIPPED = sorted(
    [*ROOT.glob("experiments/*.yaml"), *ROOT.glob("examples/*.yaml"), *ROOT.glob("benchmarks/gpu/*.yaml")]
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_manifest_loads(path):
    manifest = load(path)
    assert manifest.experiments
    assert manifest.run_dir.parent.parent == path.parent / "runs" or manifest.run_dir.parent.name == "runs"


def test_the_24_hour_plan_fits_on_four_h100s():
    manifest = load(ROOT / "experiments" / "h100x4.yaml")
    assert len(manifest.experiments) == 76
    data = plan_data(manifest, parse_gpu_spec("4x80GB", "node"), time_limit_s=24 * 3600)
    assert data["fits"], data["makespan_s"]
    assert data["lower_bound_s"] <= data["makespan_s"] <= 24 * 3600
