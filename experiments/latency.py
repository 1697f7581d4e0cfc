"""Inference latency of the bridge (the latency phase): one cell of compression x batch size.

    python experiments/latency.py --compression 4 --batch-size 8 --out OUT
        [--size small|medium|large] [--sender ...] [--receiver ...] [--seq-len 128]
        [--warmup 10] [--iters 100] [--dtype float32|bfloat16]

Times the whole bridge pipeline (sender over seq-len tokens, projection to
ceil(seq-len / compression) soft tokens, receiver over those) and, as the reference it
competes with, the receiver reading the seq-len text tokens itself. Inputs are random token
ids (seeded). After the warm-up iterations (allocator, kernel selection, lazy init), each
timed iteration is synchronized on CUDA, so a number is the wall time of one forward pass.
Timings are only meaningful when nothing else shares the device: manifests mark these
experiments exclusive.

results.json: bridge_ms and text_ms {median, p90, mean, min}, speedup (text median / bridge
median), throughput (examples/s at the bridge median), soft_tokens, peak_gpu_mem_bytes
(null on the CPU), wall_s, config.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import common
import models


def time_ms(fn: Callable[[], object], warmup: int, iters: int, device: torch.device) -> list[float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times_ms: list[float]) -> dict[str, float]:
    p90 = statistics.quantiles(times_ms, n=10, method="inclusive")[-1] if len(times_ms) > 1 else times_ms[0]
    return {"median": statistics.median(times_ms), "p90": p90, "mean": statistics.fmean(times_ms), "min": min(times_ms)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--compression", type=float, default=4.0, help="sender tokens per soft token")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--size", choices=sorted(models.SIZES), default="small")
    p.add_argument("--sender", default=None, help="default: tiny-bert-SIZE")
    p.add_argument("--receiver", default=None, help="default: tiny-gpt2-SIZE")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args(argv)
    args.sender = args.sender or f"tiny-bert-{args.size}"
    args.receiver = args.receiver or f"tiny-gpt2-{args.size}"
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("latency.py: --iters must be >= 1 and --warmup >= 0")

    run = common.setup(args)
    tok = common.load_tokenizer(args.sender, args.data_dir)
    model = models.load_bridge(
        args.sender, args.receiver, len(tok), common.DTYPES[args.dtype], args.seq_len, args.compression, num_labels=2,
    ).to(run.device).eval()
    soft_tokens = model.soft_tokens
    ids = torch.randint(len(tok), (args.batch_size, args.seq_len), device=run.device)
    mask = torch.ones_like(ids)
    text_ids = ids % int(model.receiver.config.vocab_size)

    with torch.inference_mode():
        bridge = summary(time_ms(lambda: model(ids, mask), args.warmup, args.iters, run.device))
        text = summary(time_ms(lambda: model.receiver(input_ids=text_ids, attention_mask=mask), args.warmup, args.iters, run.device))
    common.log(f"compression {args.compression:g} batch {args.batch_size}: bridge median {bridge['median']:.2f} ms "
               f"p90 {bridge['p90']:.2f} ms; text median {text['median']:.2f} ms")
    return common.finish(args, run, {
        "bridge_ms": bridge,
        "text_ms": text,
        "speedup": text["median"] / bridge["median"],
        "throughput": args.batch_size / (bridge["median"] / 1e3),
        "soft_tokens": soft_tokens,
    })


if __name__ == "__main__":
    main()
