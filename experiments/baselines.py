"""Baselines of the bridge (the baselines phase): LoRA fine-tuning and zero-shot prompting.

    python experiments/baselines.py --method lora --task sst2 --seed 42 --out OUT
        [--model tiny-gpt2-small|HUB_ID|PATH] [--rank 8] [--alpha 16] [--steps 300] [--lr 3e-3]
        [--ckpt-every 50] [--resume]
    python experiments/baselines.py --method zeroshot --task sst2 --out OUT [--model ...]

Both read the text directly with the receiver model (default: the seeded tiny-gpt2 preset that
bridge.py uses as receiver), the upper and lower references for what the bridge's soft
tokens carry:
- lora: a classification head plus LoRA adapters (peft; its default target modules for the
  model type, e.g. c_attn for GPT-2, q_proj/v_proj for Llama) trained on the training split.
  Checkpoints and resume as every training script (training.py).
- zeroshot: no training; each label's verbalizer (tasks.json "labels") is scored by its
  log-likelihood after the task's prompt, also calibrated against a content-free prompt
  (contextual calibration, Zhao et al. 2021). A random tiny preset scores at about the
  majority rate: the number is meaningful with a pretrained --model.

results.json: accuracy, macro_f1, majority_rate (+ calibrated_accuracy for zeroshot;
loss, trainable_params, resumed_from for lora), wall_s, config.
"""

from __future__ import annotations

from typing import Any

import torch

import common
import models
import training


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--method", choices=["lora", "zeroshot"], required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="tiny-gpt2-small", help="tiny preset, hub id or local path")
    p.add_argument("--max-len", type=int, default=32, help="text tokens (lora)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    common.add_training_args(p, steps=300, lr=3e-3)
    args = p.parse_args(argv)

    run = common.setup(args)
    task = common.load_task(args.task, args.data_dir, args.max_train, args.max_test)
    if task.kind != "classification":
        raise SystemExit(f"baselines.py: task {args.task!r} is {task.kind}, not classification")
    tok = common.load_tokenizer(args.model, args.data_dir)
    metrics = lora(args, run, task, tok) if args.method == "lora" else zeroshot(args, run, task, tok)
    common.log(f"{args.method} {args.task}: test accuracy {metrics['accuracy']:.3f} (majority {metrics['majority_rate']:.3f})")
    return common.finish(args, run, metrics)


def lora(args: Any, run: common.Run, task: common.Task, tok: Any) -> dict[str, Any]:
    from peft import LoraConfig, TaskType, get_peft_model

    base = models.load_classifier(args.model, len(tok), len(task.labels), tok.pad_token_id, common.DTYPES[args.dtype])
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
        fan_in_fan_out=base.config.model_type == "gpt2",  # GPT-2 stores its weights transposed (Conv1D)
    )
    model = get_peft_model(base, config).to(run.device)

    train_x = common.encode(tok, task.train["text"], args.max_len, run.device)
    train_y = torch.tensor(task.train["label"], device=run.device)

    def step_loss(m: Any, step: int) -> torch.Tensor:
        rows = common.batch_indices(len(train_y), args.batch_size, step, args.seed)
        logits = m(input_ids=train_x["input_ids"][rows], attention_mask=train_x["attention_mask"][rows]).logits
        return torch.nn.functional.cross_entropy(logits.float(), train_y[rows])

    outcome = training.train(model, step_loss, training.LoopSpec.from_args(args), run.out, vars(args))
    test_x = common.encode(tok, task.test["text"], args.max_len, run.device)
    preds = common.predict(lambda i, m: model(input_ids=i, attention_mask=m).logits, test_x, args.batch_size * 4)
    return {
        **common.classification_metrics(preds, task.test["label"], len(task.labels)),
        "loss": {"final": outcome.final_loss, "curve": [list(x) for x in outcome.losses]},
        "trainable_params": sum(x.numel() for x in model.parameters() if x.requires_grad),
        "total_params": sum(x.numel() for x in model.parameters()),
        "resumed_from": outcome.resumed_from,
        "s_per_step": outcome.s_per_step,
    }


@torch.no_grad()
def label_logprobs(lm: Any, tok: Any, prompts: list[str], labels: tuple[str, ...], device: torch.device, batch_size: int) -> torch.Tensor:
    """(N, C): sum of log p(label tokens | prompt) for every prompt and label verbalizer."""
    label_ids = [tok(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
    rows: list[tuple[list[int], int]] = []  # (prompt + label ids, where the label starts)
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        rows.extend((ids + lab, len(ids)) for lab in label_ids)
    pad = tok.pad_token_id
    scores = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, (ids, _) in enumerate(chunk):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        logp = lm(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
        for r, (ids, start) in enumerate(chunk):
            # token t is predicted at position t - 1
            targets = torch.tensor(ids[start:])
            scores.append(logp[r, start - 1 : len(ids) - 1].gather(1, targets[:, None]).sum().item())
    return torch.tensor(scores).view(len(prompts), len(labels))


def zeroshot(args: Any, run: common.Run, task: common.Task, tok: Any) -> dict[str, Any]:
    lm = models.load_causal_lm(args.model, len(tok), common.DTYPES[args.dtype]).to(run.device).eval()
    prompts = [task.prompt.format(text=text) for text in task.test["text"]]
    batch = args.batch_size * 4
    scores = label_logprobs(lm, tok, prompts, task.labels, run.device, batch)
    content_free = label_logprobs(lm, tok, [task.prompt.format(text="")], task.labels, run.device, batch)
    metrics = common.classification_metrics(scores.argmax(-1), task.test["label"], len(task.labels))
    calibrated = common.classification_metrics((scores - content_free).argmax(-1), task.test["label"], len(task.labels))
    return {**metrics, "calibrated_accuracy": calibrated["accuracy"], "calibrated_macro_f1": calibrated["macro_f1"]}


if __name__ == "__main__":
    main()
