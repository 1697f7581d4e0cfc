"""The experiment scripts on tiny settings, and a real preempted-then-resumed training run.

Scripts run in-process through their main(argv) (one import of torch and transformers for
the whole file); the preemption test runs bridge.py as a subprocess, signals it, reruns it
with GPUPACK_RESUME=1 and checks that the result equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

for _dep in ("torch", "transformers", "datasets", "peft", "accelerate"):
    pytest.importorskip(_dep)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GPUPACK_* from the outside; signal handlers the scripts install are put back."""
    for var in [v for v in os.environ if v.startswith("GPUPACK_")]:
        monkeypatch.delenv(var)
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def strict_json(path: Path) -> dict[str, Any]:
    def no_constant(name: str) -> None:
        raise ValueError(f"{path}: {name} is not JSON")

    data: dict[str, Any] = json.loads(path.read_text(), parse_constant=no_constant)
    return data


def run(script: str, out: Path, *args: str) -> dict[str, Any]:
    """main(argv) of experiments/<script>.py; returns its results.json, checked to be valid."""
    module = importlib.import_module(script)
    module.main([*args, "--out", str(out), "--threads", "1", "--device", "cpu"])
    results = strict_json(out / "results.json")
    assert results["config"]["seed"] is not None and results["wall_s"] >= 0
    return results


def test_shipped_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_data", EXPERIMENTS / "data" / "make_data.py")
    assert spec and spec.loader
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    for path in make_data.generate(tmp_path):
        shipped = EXPERIMENTS / "data" / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun make_data.py"


def test_rouge_by_hand() -> None:
    import rouge

    # unigrams: the x2, cat, on, mat -> 5 of 6 both ways; bigrams: the-cat, on-the, the-mat -> 3 of 5;
    # LCS "the cat on the mat" -> 5 of 6
    s = rouge.score("The cat sat on the mat.", "the cat is on the mat")
    assert s["rouge1"] == pytest.approx(5 / 6) and s["rouge2"] == pytest.approx(3 / 5)
    assert s["rougeL"] == pytest.approx(5 / 6)
    assert rouge.score("", "the cat") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge.corpus(["a b", "c"], ["a b", "d"])["rouge1"] == pytest.approx(0.5)


def test_bridge_learns(tmp_path: Path) -> None:
    r = run("bridge", tmp_path, "--task", "agnews", "--steps", "120", "--max-len", "16", "--log-every", "40")
    assert r["accuracy"] > r["majority_rate"] + 0.2  # 4 topics: chance is about 0.26
    assert r["loss"]["curve"][-1][1] < r["loss"]["curve"][0][1]
    assert r["soft_tokens"] == 4 and r["resumed_from"] == 0
    assert r["trainable_params"] < r["total_params"]  # sender and receiver stay frozen


def test_bridge_size_ablation(tmp_path: Path) -> None:
    params = []
    for size in ("small", "medium", "large"):
        r = run("bridge", tmp_path / size, "--size", size, "--steps", "2", "--max-test", "16", "--max-len", "8")
        assert r["config"]["sender"] == f"tiny-bert-{size}"
        params.append(r["total_params"])
    assert params == sorted(params) and len(set(params)) == 3


def test_probe_layers(tmp_path: Path) -> None:
    r = run("probe", tmp_path / "bert", "--task", "trec", "--layers", "0", "2", "--max-train", "200", "--max-test", "50")
    assert set(r["layer"]) == {"0", "2"} and r["best_layer"] in (0, 2)
    assert all(0 <= v["accuracy"] <= 1 for v in r["layer"].values())
    r = run("probe", tmp_path / "gpt2", "--model", "tiny-gpt2-small", "--pool", "last", "--task", "trec", "--layers", "2",
            "--max-train", "200", "--max-test", "50")
    assert r["layer"]["2"]["train_accuracy"] > r["majority_rate"]


def test_probe_refuses_a_missing_layer(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--layers \[9\] out of range.*\(0\.\.2\)"):
        run("probe", tmp_path, "--layers", "9")


def test_lora_trains_adapters_only(tmp_path: Path) -> None:
    r = run("baselines", tmp_path, "--method", "lora", "--task", "sst2", "--steps", "12", "--ckpt-every", "5",
            "--max-test", "32", "--max-len", "16")
    assert 0 < r["trainable_params"] < r["total_params"] / 5
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 12 and saved["params"] and all("lora_" in k or "score" in k for k in saved["params"])


def test_zeroshot_scores_labels_like_a_full_forward(tmp_path: Path) -> None:
    import baselines
    import common
    import models

    r = run("baselines", tmp_path, "--method", "zeroshot", "--task", "trec", "--max-test", "24")
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["calibrated_accuracy"] <= 1
    # The batched, padded scoring equals the log-likelihood read off one unpadded sequence.
    tok = common.word_tokenizer()
    lm = models.load_causal_lm("tiny-gpt2-small", len(tok)).eval()
    prompts, labels = ["question : who invented jazz ? answer type :", "question : why ?"], ("person", "number")
    batched = baselines.label_logprobs(lm, tok, prompts, labels, torch.device("cpu"), batch_size=3)
    ids = tok(prompts[0] + " person")["input_ids"]
    with torch.no_grad():
        logp = lm(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
    assert batched[0, 0].item() == pytest.approx(logp[len(ids) - 2, ids[-1]].item(), abs=1e-5)


def test_latency_cell(tmp_path: Path) -> None:
    r = run("latency", tmp_path, "--compression", "8", "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--iters", "5")
    assert r["soft_tokens"] == 4 and r["peak_gpu_mem_bytes"] is None  # CPU
    for stats in (r["bridge_ms"], r["text_ms"]):
        assert 0 < stats["min"] <= stats["median"] <= stats["p90"]
    assert r["throughput"] == pytest.approx(4 / (r["bridge_ms"]["median"] / 1e3))


def test_xsum_seq2seq_and_extractive_baselines(tmp_path: Path) -> None:
    r = run("xsum", tmp_path / "t5", "--steps", "6", "--max-test", "8", "--batch-size", "8", "--max-target", "12")
    assert all(0 <= r[k] <= 1 for k in ("rouge1", "rouge2", "rougeL"))
    assert r["world_size"] == 1 and len(r["examples"]) == 3
    lead = run("xsum", tmp_path / "lead", "--method", "lead")
    oracle = run("xsum", tmp_path / "oracle", "--method", "oracle")
    assert oracle["rougeL"] >= lead["rougeL"] > 0  # the oracle picks the best sentence for ROUGE-L


def test_resume_ignores_a_checkpoint_of_another_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--steps", "4", "--ckpt-every", "2", "--max-test", "8", "--max-len", "8"]
    run("bridge", tmp_path, *args)
    monkeypatch.setenv("GPUPACK_RESUME", "1")
    assert run("bridge", tmp_path, *args)["resumed_from"] == 4  # finished: straight to evaluation
    assert run("bridge", tmp_path, *args, "--lr", "0.5")["resumed_from"] == 0
    assert "from another config: ignoring it" in capsys.readouterr().out


def wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before writing {path}:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {timeout_s} s")
        time.sleep(0.02)  # polling a file another process writes: there is no event to wait on


def test_preempted_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    env = os.environ | {"GPUPACK_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["--max-len", "16", "--batch-size", "16", "--ckpt-every", "10", "--log-every", "10", "--max-test", "64",
              "--device", "cpu"]  # bit-for-bit equality below holds on the CPU
    cmd = [sys.executable, str(EXPERIMENTS / "bridge.py"), *common]
    # So many steps that it can only end by the signal.
    proc = subprocess.Popen([*cmd, "--steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(out / "checkpoint.pt", proc, timeout_s=120)
    proc.send_signal(signal.SIGUSR2)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR2, log
    stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", log).group(1))  # type: ignore[union-attr]
    assert stopped >= 10 and not (out / "results.json").exists()

    total = stopped + 20
    resumed = subprocess.run([*cmd, "--steps", str(total)], env=env | {"GPUPACK_RESUME": "1"},
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stdout
    assert f"step {total}/{total}" in resumed.stdout and f"step 10/{total}" not in resumed.stdout
    results = strict_json(out / "results.json")
    assert results["resumed_from"] == stopped and results["config"]["steps"] == total

    # The same steps without an interruption, in-process: identical parameters and predictions.
    ref = run("bridge", tmp_path / "ref", *common, "--steps", str(total))
    assert ref["accuracy"] == results["accuracy"] and ref["macro_f1"] == results["macro_f1"]
    a = torch.load(out / "checkpoint.pt", weights_only=True)["params"]
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_rank_xsum_stops_together_and_resumes(tmp_path: Path) -> None:
    """DDP over gloo: the parent gets the signal as gpupack sends it (the command alone) and passes it
    on; every rank stops at one step."""
    out = tmp_path / "exp"
    env = os.environ | {"GPUPACK_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(EXPERIMENTS / "xsum.py"), "--nproc", "2", "--device", "cpu", "--batch-size", "8", "--max-test", "8",
           "--max-target", "12", "--ckpt-every", "5", "--log-every", "5"]
    proc = subprocess.Popen([*cmd, "--steps", "100000"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wait_for(out / "checkpoint.pt", proc, timeout_s=120)
    os.kill(proc.pid, signal.SIGUSR2)  # the command alone, as gpupack signals it
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR2, log
    stops = re.findall(r"preempted at step (\d+)", log)
    assert len(stops) == 1, log  # logged by the main rank only, after the ranks agreed on the step
    stopped = int(stops[0])

    resumed = subprocess.run([*cmd, "--steps", str(stopped + 4)], env=env | {"GPUPACK_RESUME": "1"},
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stdout.count(f"resumed from step {stopped}") == 1
    results = strict_json(out / "results.json")
    assert results["world_size"] == 2 and results["resumed_from"] == stopped
    assert all(0 <= results[k] <= 1 for k in ("rouge1", "rouge2", "rougeL"))
