"""What every experiment script shares: arguments, seeding, device, data, tokenizer, results.

Scripts import this as a sibling module (`python experiments/<script>.py` puts experiments/
on sys.path) and gpupack.job from the repository (PYTHONPATH=. in the manifests, or an
installed gpupack).

Data: experiments/data/<task>/{train,test}.jsonl, loaded through `datasets` from local JSON
lines; tasks.json there says each task's kind, label names and prompt (see
data/make_data.py). --data-dir points elsewhere for real data in the same layout.

No download happens unless asked for: HF_HUB_OFFLINE=1 is the default here, so the tiny
models built from configs never touch the hub, and a hub id given with --model fails
fast unless it is in the local cache (set HF_HUB_OFFLINE=0 to allow downloads).
"""

from __future__ import annotations

import os

# Before transformers/datasets are imported: they read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from gpupack import job  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"


def base_parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every script takes; each script adds its own knobs."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: $GPUPACK_OUT, else ./out)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def add_training_args(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int = 32) -> None:
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps (and on preemption)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true", help="resume from {out}/checkpoint.pt (implied by GPUPACK_RESUME=1)")


@dataclass(frozen=True)
class Run:
    """What setup() decided: where outputs go, which device, when the script started."""

    out: Path
    device: torch.device
    started_s: float


def setup(args: argparse.Namespace) -> Run:
    """Seed every RNG, pick the device and the output directory; log one line about it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = pick_device(args.device)
    out = job.out_dir(args.out)
    log(f"{Path(sys.argv[0]).name}: out={out} device={device} seed={args.seed} attempt={job.attempt()}")
    return Run(out, device, time.time())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def log(message: str) -> None:
    # One flushed line at a time: the log is a file that gpupack and people tail.
    print(message, flush=True)


# --- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # classification | summarization
    labels: tuple[str, ...]  # label names, in label-id order (empty for summarization)
    prompt: str  # with a {text} placeholder
    train: Any  # datasets.Dataset
    test: Any


def load_task(name: str, data_dir: Path = DATA_DIR, limit_train: int = 0, limit_test: int = 0) -> Task:
    """A task's splits as datasets.Dataset (optionally the first N rows of each)."""
    import datasets

    datasets.disable_progress_bars()
    specs = json.loads((data_dir / "tasks.json").read_text())
    if name not in specs:
        raise SystemExit(f"{data_dir / 'tasks.json'}: unknown task {name!r} (known: {', '.join(sorted(specs))})")
    spec = specs[name]
    files = {split: str(data_dir / name / f"{split}.jsonl") for split in ("train", "test")}
    ds = datasets.load_dataset("json", data_files=files)
    train, test = ds["train"], ds["test"]
    if limit_train:
        train = train.select(range(min(limit_train, len(train))))
    if limit_test:
        test = test.select(range(min(limit_test, len(test))))
    return Task(name, spec["kind"], tuple(spec.get("labels", ())), spec["prompt"], train, test)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The rows of training step `step`: a fresh permutation each epoch, fixed by (seed, epoch).

    A function of the step alone, so a resumed run sees exactly the batches it would have
    seen without the interruption; no data-loader state needs checkpointing.
    """
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size].tolist()


# --- tokenizer --------------------------------------------------------------------------


def word_tokenizer(data_dir: Path = DATA_DIR) -> Any:
    """The in-project word-level tokenizer over data_dir/vocab.txt, as a transformers tokenizer.

    Lower-cased, split into words and punctuation like data/make_data.py; unknown words map
    to [UNK]. Wrapped in PreTrainedTokenizerFast so that scripts call it exactly as they call
    a hub tokenizer loaded with AutoTokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (data_dir / "vocab.txt").read_text().split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def load_tokenizer(model: str, data_dir: Path = DATA_DIR) -> Any:
    """The word tokenizer for a tiny preset or random: model, else the model's own (from_pretrained)."""
    if is_preset(model) or is_random(model):
        return word_tokenizer(data_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:  # decoder-only tokenizers (GPT-2, Llama) have none
        tok.pad_token = tok.eos_token
    return tok


RANDOM = "random:"


def is_random(model: str) -> bool:
    """random:<hub id or path>: that model's architecture with random weights (models.py)."""
    return model.startswith(RANDOM)


def is_preset(model: str) -> bool:
    """Tiny presets are named tiny-<family>-<size>; an existing local path always wins."""
    return model.startswith("tiny-") and not Path(model).exists()


def encode(tokenizer: Any, texts: Sequence[str], max_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Pad to max_len exactly, so shapes (and the bridge's soft-token count) are fixed."""
    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


# --- results ----------------------------------------------------------------------------


def finish(args: argparse.Namespace, run: Run, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Write {out}/results.json: the metrics, the config that produced them, and provenance."""
    cuda = run.device.type == "cuda"
    results = {
        **metrics,
        "wall_s": round(time.time() - run.started_s, 3),
        # What the caching allocator held at most: NVML shows this plus the CUDA context.
        "peak_gpu_mem_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        # results.py reads everything outside "config" as metrics.
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"runtime": {
            "script": Path(sys.argv[0]).name,
            "device": str(run.device),
            "gpu": torch.cuda.get_device_name(run.device) if cuda else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "attempt": job.attempt(),
            "experiment": os.environ.get("GPUPACK_EXPERIMENT"),
        }},
    }
    path = job.write_results(results, run.out / "results.json")
    log(f"wrote {path}")
    return results


# --- evaluation -------------------------------------------------------------------------


@torch.no_grad()
def predict(logits_fn: Any, enc: Mapping[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """argmax of logits_fn(input_ids, attention_mask) over enc, in batches; on the CPU."""
    preds = []
    for i in range(0, enc["input_ids"].shape[0], batch_size):
        logits = logits_fn(enc["input_ids"][i : i + batch_size], enc["attention_mask"][i : i + batch_size])
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(preds)


def classification_metrics(preds: torch.Tensor, labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and the majority-class rate (the chance level to beat)."""
    gold = torch.tensor(list(labels))
    f1s = []
    for c in range(num_labels):
        tp = ((preds == c) & (gold == c)).sum().item()
        fp = ((preds == c) & (gold != c)).sum().item()
        fn = ((preds != c) & (gold == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {
        "accuracy": (preds == gold).double().mean().item(),
        "macro_f1": sum(f1s) / num_labels,
        "majority_rate": torch.bincount(gold, minlength=num_labels).max().item() / len(gold),
    }


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
