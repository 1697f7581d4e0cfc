"""gpupack.job: the helpers experiment code uses (out dir, resume, preempt hook, atomic writes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpupack import job


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("GPUPACK_OUT", "GPUPACK_RESUME", "GPUPACK_ATTEMPT", "GPUPACK_PREEMPT_SIGNAL"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def restore_handlers() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_out_dir_precedence(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.chdir(tmp_path)
    assert job.out_dir() == tmp_path / "out"
    clean_env.setenv("GPUPACK_OUT", str(tmp_path / "env"))
    assert job.out_dir() == tmp_path / "env"
    assert job.out_dir(tmp_path / "arg") == tmp_path / "arg"
    assert all((tmp_path / d).is_dir() for d in ("out", "env", "arg"))


def test_resuming_and_attempt(clean_env: pytest.MonkeyPatch) -> None:
    assert not job.resuming() and job.attempt() == 1
    clean_env.setenv("GPUPACK_RESUME", "0")
    assert not job.resuming()
    clean_env.setenv("GPUPACK_RESUME", "1")
    clean_env.setenv("GPUPACK_ATTEMPT", "3")
    assert job.resuming() and job.attempt() == 3
    clean_env.setenv("GPUPACK_ATTEMPT", "three")
    with pytest.raises(ValueError, match="GPUPACK_ATTEMPT"):
        job.attempt()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, (signal.SIGUSR2, signal.SIGTERM)),
        ("USR1", (signal.SIGUSR1, signal.SIGTERM)),
        ("sigusr1", (signal.SIGUSR1, signal.SIGTERM)),
        (str(int(signal.SIGUSR1)), (signal.SIGUSR1, signal.SIGTERM)),
        ("TERM", (signal.SIGTERM,)),
    ],
)
def test_preempt_signals(clean_env: pytest.MonkeyPatch, raw: str | None, expected: tuple) -> None:
    if raw is not None:
        clean_env.setenv("GPUPACK_PREEMPT_SIGNAL", raw)
    assert job.preempt_signals() == expected


def test_bad_preempt_signal_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GPUPACK_PREEMPT_SIGNAL", "USR9")
    with pytest.raises(ValueError, match="GPUPACK_PREEMPT_SIGNAL.*USR9"):
        job.preempt_signals()


def test_on_preempt_calls_once(clean_env: pytest.MonkeyPatch, restore_handlers: None) -> None:
    calls: list[int] = []
    job.on_preempt(lambda: calls.append(1))
    assert job.preempt_signal() is None
    signal.raise_signal(signal.SIGUSR2)
    signal.raise_signal(signal.SIGTERM)  # a second signal in the grace period: ignored
    assert calls == [1]
    assert job.preempt_signal() == signal.SIGUSR2


def test_on_preempt_honours_override(clean_env: pytest.MonkeyPatch, restore_handlers: None) -> None:
    clean_env.setenv("GPUPACK_PREEMPT_SIGNAL", "USR1")
    calls: list[int] = []
    job.on_preempt(lambda: calls.append(1))
    signal.raise_signal(signal.SIGUSR1)
    assert calls == [1] and job.preempt_signal() == signal.SIGUSR1


def test_write_results_atomic(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("GPUPACK_OUT", str(tmp_path))
    path = job.write_results({"acc": 0.5, "loss": float("nan"), "per_layer": (1.0, float("inf"))})
    assert path == tmp_path / "results.json"
    assert json.loads(path.read_text()) == {"acc": 0.5, "loss": None, "per_layer": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), job.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_whole_file_writes_get_the_mode_of_a_plain_open_not_0600(tmp_path: Path, umask: int) -> None:
    """Results, checkpoints, reports and status.json are read by the user's group on a shared run
    directory: the umask decides, as for any file the user writes."""
    code = (
        f"import os; os.umask({umask}); from pathlib import Path; from gpupack import job, files; "
        f"job.write_results({{'a': 1}}, Path({str(tmp_path)!r}) / 'results.json'); "
        f"files.write_atomic(Path({str(tmp_path)!r}) / 'status.json', b'{{}}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in ("results.json", "status.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt" / "checkpoint.pt"
    assert job.load_checkpoint(path) is None
    job.save_checkpoint({"step": 7, "w": torch.arange(3.0), "rng": torch.get_rng_state()}, path)
    state = job.load_checkpoint(path)
    assert state is not None and state["step"] == 7
    assert torch.equal(state["w"], torch.arange(3.0))


def test_job_imports_without_torch() -> None:
    # Experiment code that never touches torch must not pay for it (or need it installed).
    code = "import sys, gpupack.job; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
