"""Judging an ended attempt: exit status, declared outputs, and the CUDA out-of-memory signature."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# torch's allocator, the CUDA runtime/driver, cuBLAS and cuDNN say "out of memory" in these words.
_OOM = re.compile(
    rb"CUDA out of memory|torch\.(?:cuda\.)?OutOfMemoryError|CUDA error: out of memory|"
    rb"CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|CUBLAS_STATUS_ALLOC_FAILED|"
    rb"CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)|NCCL WARN .*out of memory"
)
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    reason: str | None  # why it failed, one line
    oom: bool = False


def missing_outputs(outputs: Sequence[str], workdir: Path) -> str | None:
    """The first declared output that is missing or, for .json, does not parse."""
    for output in outputs:
        path = Path(output)
        if not path.is_absolute():
            path = workdir / path
        if not path.is_file():
            return f"output {output} is missing"
        if path.suffix == ".json":
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                return f"output {output} is not valid JSON ({str(exc).splitlines()[0]})"
    return None


def log_shows_oom(log_path: Path) -> bool:
    """Only the log's tail is read: the error that ended the process is at its end."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            return _OOM.search(f.read()) is not None
    except OSError:
        return False


def judge(exit_code: int | None, outputs: Sequence[str], workdir: Path, log_path: Path) -> Outcome:
    if exit_code == 0:
        missing = missing_outputs(outputs, workdir)
        return Outcome(missing is None, missing)
    oom = log_shows_oom(log_path)
    if exit_code is None:
        return Outcome(False, "ended with an unknown status", oom)
    if exit_code == 127:
        return Outcome(False, "command not found (exit 127)", oom)
    if exit_code == 126:
        return Outcome(False, "command not executable (exit 126)", oom)
    if exit_code > 128:
        return Outcome(False, f"killed by signal {exit_code - 128}", oom)
    return Outcome(False, "CUDA out of memory" if oom else f"exit code {exit_code}", oom)
