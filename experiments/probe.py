"""Linear probes (the probes phase): logistic regression on a frozen model's hidden states.

    python experiments/probe.py --model tiny-bert-small --task sst2 --layers 0 2 --seed 0 --out OUT
        [--pool mean|last] [--max-len 32] [--l2 1e-3] [--iters 100] [--dtype float32|bfloat16]

For each layer (0 = the embeddings, L = the last block's output) the text's hidden states
are pooled (mean over real tokens, or the last real token, as a decoder reads), standardized
with the training split's statistics, and a multinomial logistic regression with an L2
penalty is fit full-batch with L-BFGS. Default models are the same seeded tiny presets that
bridge.py builds, so a probe reads what the bridge reads.

results.json: layer.<L>.{accuracy, train_accuracy, macro_f1}, best_layer, best_accuracy,
majority_rate, hidden_size, num_layers, wall_s, config.
"""

from __future__ import annotations

from typing import Any

import torch

import common
import models


@torch.no_grad()
def features(model: Any, enc: dict[str, torch.Tensor], layers: list[int], pool: str, batch_size: int) -> dict[int, torch.Tensor]:
    """Pooled hidden states per layer, float32 on the CPU: {layer: (N, hidden)}."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, enc["input_ids"].shape[0], batch_size):
        ids, mask = enc["input_ids"][i : i + batch_size], enc["attention_mask"][i : i + batch_size]
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in layers:
            h = hidden[layer].float()
            if pool == "mean":
                pooled = models.mean_pool(h, mask)
            else:
                last = mask.sum(1).clamp(min=1) - 1  # right padding: the last real token
                pooled = h[torch.arange(h.shape[0], device=h.device), last]
            out[layer].append(pooled.cpu())
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_labels: int, l2: float, iters: int) -> torch.nn.Linear:
    """Multinomial logistic regression, full-batch L-BFGS (deterministic: no sampling)."""
    clf = torch.nn.Linear(x.shape[1], num_labels, dtype=torch.float64)
    torch.nn.init.zeros_(clf.weight)
    torch.nn.init.zeros_(clf.bias)
    x = x.double()
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-bert-small", help="tiny preset, hub id or local path")
    p.add_argument("--task", default="sst2")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2], help="0 = embeddings")
    p.add_argument("--pool", choices=["mean", "last"], default="mean")
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--l2", type=float, default=1e-3)
    p.add_argument("--iters", type=int, default=100, help="L-BFGS iterations")
    p.add_argument("--batch-size", type=int, default=128, help="feature extraction batch")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    args = p.parse_args(argv)

    run = common.setup(args)
    task = common.load_task(args.task, args.data_dir, args.max_train, args.max_test)
    tok = common.load_tokenizer(args.model, args.data_dir)
    model = models.load_backbone(args.model, len(tok), common.DTYPES[args.dtype]).to(run.device).eval()
    num_layers = int(model.config.num_hidden_layers)
    bad = [layer for layer in args.layers if not 0 <= layer <= num_layers]
    if bad:
        raise SystemExit(f"probe.py: --layers {bad} out of range for {args.model} (0..{num_layers})")

    feats = {}
    for split in ("train", "test"):
        enc = common.encode(tok, task.__dict__[split]["text"], args.max_len, run.device)
        feats[split] = features(model, enc, args.layers, args.pool, args.batch_size)
    y_train = torch.tensor(task.train["label"])
    per_layer: dict[str, dict[str, float]] = {}
    for layer in args.layers:
        x_train, x_test = feats["train"][layer], feats["test"][layer]
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
        clf = fit_logistic((x_train - mean) / std, y_train, len(task.labels), args.l2, args.iters)
        with torch.no_grad():
            train_pred = clf(((x_train - mean) / std).double()).argmax(-1)
            test_pred = clf(((x_test - mean) / std).double()).argmax(-1)
        m = common.classification_metrics(test_pred, task.test["label"], len(task.labels))
        train_acc = (train_pred == y_train).double().mean().item()
        per_layer[str(layer)] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_accuracy": train_acc}
        common.log(f"layer {layer}: test accuracy {m['accuracy']:.3f} (train {train_acc:.3f})")

    best = max(per_layer, key=lambda layer: per_layer[layer]["accuracy"])
    return common.finish(args, run, {
        "layer": per_layer,
        "best_layer": int(best),
        "best_accuracy": per_layer[best]["accuracy"],
        "majority_rate": m["majority_rate"],
        "hidden_size": models.hidden_size(model),
        "num_layers": num_layers,
    })


if __name__ == "__main__":
    main()
