"""Bridge training (the seeds phase and the model-size ablation): sender -> projection -> receiver.

    python experiments/bridge.py --task sst2 --seed 42 --out OUT
        [--size small|medium|large]           tiny presets of both models (the ablation)
        [--sender tiny-bert-small|HUB_ID|PATH] [--receiver tiny-gpt2-small|HUB_ID|PATH]
        [--compression 4] [--max-len 32] [--train-models] [--dtype float32|bfloat16]
        [--steps 300] [--batch-size 32] [--lr 1e-3] [--ckpt-every 50] [--resume]

The sender reads the text; the bridge compresses its hidden states into
ceil(max_len / compression) soft tokens for the receiver, whose last hidden state a linear
head classifies (models.BridgeClassifier). Only the bridge and the head train unless
--train-models. Checkpoints and resume: training.py.

results.json: accuracy, macro_f1 and majority_rate on the test split, loss (final and per
log step), soft_tokens, trainable_params, total_params, resumed_from, wall_s, config.
"""

from __future__ import annotations

from typing import Any

import common
import models
import training


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2", help="a task of DATA_DIR/tasks.json (classification)")
    p.add_argument("--size", choices=sorted(models.SIZES), default="small", help="preset size of both models")
    p.add_argument("--sender", default=None, help="default: tiny-bert-SIZE")
    p.add_argument("--receiver", default=None, help="default: tiny-gpt2-SIZE")
    p.add_argument("--compression", type=float, default=4.0, help="sender tokens per soft token")
    p.add_argument("--max-len", type=int, default=32, help="sender tokens (padded/truncated)")
    p.add_argument("--train-models", action="store_true", help="also train sender and receiver")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32", help="of sender and receiver")
    p.add_argument("--max-train", type=int, default=0, help="use the first N training rows (0: all)")
    p.add_argument("--max-test", type=int, default=0, help="evaluate on the first N test rows (0: all)")
    common.add_training_args(p, steps=300, lr=1e-3)
    args = p.parse_args(argv)
    args.sender = args.sender or f"tiny-bert-{args.size}"
    args.receiver = args.receiver or f"tiny-gpt2-{args.size}"

    run = common.setup(args)
    task = common.load_task(args.task, args.data_dir, args.max_train, args.max_test)
    if task.kind != "classification":
        raise SystemExit(f"bridge.py: task {args.task!r} is {task.kind}, not classification")
    tok = common.load_tokenizer(args.sender, args.data_dir)
    model = models.load_bridge(
        args.sender, args.receiver, len(tok), common.DTYPES[args.dtype], args.max_len, args.compression,
        num_labels=len(task.labels), train_models=args.train_models,
    ).to(run.device)
    soft_tokens = model.soft_tokens

    train_x = common.encode(tok, task.train["text"], args.max_len, run.device)
    train_y = common.torch.tensor(task.train["label"], device=run.device)
    n = len(train_y)

    def step_loss(m: Any, step: int) -> Any:
        rows = common.batch_indices(n, args.batch_size, step, args.seed)
        logits = m(train_x["input_ids"][rows], train_x["attention_mask"][rows])
        return common.torch.nn.functional.cross_entropy(logits, train_y[rows])

    outcome = training.train(model, step_loss, training.LoopSpec.from_args(args), run.out, vars(args))

    test_x = common.encode(tok, task.test["text"], args.max_len, run.device)
    preds = common.predict(model, test_x, args.batch_size * 4)
    metrics = common.classification_metrics(preds, task.test["label"], len(task.labels))
    common.log(f"{args.task}: test accuracy {metrics['accuracy']:.3f} (majority {metrics['majority_rate']:.3f})")
    return common.finish(args, run, {
        **metrics,
        "loss": {"final": outcome.final_loss, "curve": [list(x) for x in outcome.losses]},
        "soft_tokens": soft_tokens,
        "trainable_params": sum(x.numel() for x in model.parameters() if x.requires_grad),
        "total_params": sum(x.numel() for x in model.parameters()),
        "resumed_from": outcome.resumed_from,
        "s_per_step": outcome.s_per_step,
    })


if __name__ == "__main__":
    main()
