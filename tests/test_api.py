"""The documented Python surface (README "Python API"): the README's example runs as written and
prints what the README says, and every name of each public module's `__all__` exists."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, gpupack_env


def _readme_example() -> str:
    """The first indented code block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    block: list[str] = []
    for line in section.splitlines():
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line)
        elif block:
            break
    return textwrap.dedent("\n".join(block)).strip() + "\n"


def test_the_readme_example_builds_and_checks_a_plan(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=gpupack_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        "76 experiments, makespan 10.4 h (lower bound 10.2 h), fits in 24 h: True",
        "bridge-sst2-s42 0.0 10200.0 (('node0', 0),)",
    ]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{line}`" in readme for line in lines)  # the README says what it prints


def test_the_readme_example_reports_a_bad_manifest_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "h100x4.yaml").write_text("name: x\nphases: []\n")
    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=gpupack_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "experiments/h100x4.yaml: manifest: phases: expected a non-empty list of phases, got an empty list"


@pytest.mark.parametrize("module", ["gpupack.job", "gpupack.manifest", "gpupack.simulate"])
def test_every_public_name_exists(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__doc__ and mod.__all__
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []
    undocumented = [name for name in mod.__all__ if callable(getattr(mod, name)) and not getattr(mod, name).__doc__]
    assert undocumented == []
