"""XSUM-style summarization (the XSUM phase): a seq2seq model, or an extractive baseline.

    python experiments/xsum.py --method seq2seq --seed 42 --out OUT
        [--model tiny-t5-small|HUB_ID|PATH] [--nproc N] [--steps 400] [--batch-size 32]
        [--lr 3e-3] [--max-source 64] [--max-target 24] [--num-beams 1] [--ckpt-every 50]
    python experiments/xsum.py --method lead|oracle --out OUT

- seq2seq: trains the model on document -> summary, then generates a summary of each test
  document. --nproc N (default: the GPUs it sees, at least 1) runs N data-parallel ranks
  through accelerate (spawn.py starts them): each rank takes its share of every global
  batch, so the data order does not depend on N; on the CPU the ranks talk over gloo.
  Checkpoints and resume as every training script (training.py).
- lead: the document's first sentence (XSUM's LEAD baseline); oracle: the sentence with the
  best ROUGE-L against the reference (the extractive upper bound). No model, no training.

results.json: rouge1, rouge2, rougeL (F1, rouge.py), examples (three predictions beside their
references), loss and resumed_from (seq2seq), wall_s, config.
"""

from __future__ import annotations

from typing import Any

import torch

import common
import models
import rouge
import spawn
import training


def parse(argv: list[str] | None) -> Any:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--method", choices=["seq2seq", "lead", "oracle"], default="seq2seq")
    p.add_argument("--task", default="xsum", help="a summarization task of DATA_DIR/tasks.json")
    p.add_argument("--model", default="tiny-t5-small", help="tiny-t5 preset, hub id or local path")
    p.add_argument("--nproc", type=int, default=0, help="data-parallel ranks (0: one per visible GPU, 1 on CPU)")
    p.add_argument("--max-source", type=int, default=64, help="document tokens")
    p.add_argument("--max-target", type=int, default=24, help="summary tokens (training and generation)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-test", type=int, default=0)
    common.add_training_args(p, steps=400, lr=3e-3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    if args.method == "seq2seq":
        gpus = torch.cuda.device_count() if args.device != "cpu" else 0
        nproc = args.nproc or max(1, gpus)
        code = spawn.workers(nproc)
        if code is not None:
            raise SystemExit(code)
    run = common.setup(args)
    task = common.load_task(args.task, args.data_dir, args.max_train, args.max_test)
    if task.kind != "summarization":
        raise SystemExit(f"xsum.py: task {args.task!r} is {task.kind}, not summarization")
    refs = list(task.test["summary"])
    if args.method == "seq2seq":
        preds, extra = seq2seq(args, run, task)
        if preds is None:  # not the main rank: the main one writes the results
            return None
    else:
        preds, extra = extractive(args.method, task.test["document"], refs), {}
    scores = rouge.corpus(preds, refs)
    common.log(f"{args.method}: " + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    examples = [{"prediction": p, "reference": r} for p, r in zip(preds[:3], refs[:3])]
    return common.finish(args, run, {**scores, **extra, "examples": examples})


def sentences(document: str) -> list[str]:
    return [s.strip() + " ." for s in document.split(" . ") if s.strip(" .")]


def extractive(method: str, documents: list[str], refs: list[str]) -> list[str]:
    if method == "lead":
        return [sentences(d)[0] for d in documents]
    return [max(sentences(d), key=lambda s: rouge.score(s, r)["rougeL"]) for d, r in zip(documents, refs)]


def seq2seq(args: Any, run: common.Run, task: common.Task) -> tuple[list[str] | None, dict[str, Any]]:
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    acc = Accelerator(cpu=run.device.type == "cpu")
    tok = common.load_tokenizer(args.model, args.data_dir)
    model = models.load_seq2seq(args.model, len(tok), tok.pad_token_id, tok.eos_token_id, common.DTYPES[args.dtype])
    model.to(acc.device)
    prompt = task.prompt

    def encode_sources(docs: list[str]) -> dict[str, torch.Tensor]:
        return common.encode(tok, [prompt.format(text=d) for d in docs], args.max_source, acc.device)

    src = encode_sources(task.train["document"])
    # Targets end with EOS (the word tokenizer adds no special tokens); padding is ignored (-100).
    tgt = tok([s + " " + tok.eos_token for s in task.train["summary"]], padding="max_length",
              truncation=True, max_length=args.max_target, return_tensors="pt")["input_ids"]
    labels = tgt.masked_fill(tgt == tok.pad_token_id, -100).to(acc.device)
    rank, world = acc.process_index, acc.num_processes

    def step_loss(m: Any, step: int) -> torch.Tensor:
        rows = common.batch_indices(len(labels), args.batch_size, step, args.seed)[rank::world]
        return m(input_ids=src["input_ids"][rows], attention_mask=src["attention_mask"][rows], labels=labels[rows]).loss

    outcome = training.train(model, step_loss, training.LoopSpec.from_args(args), run.out, vars(args), accelerator=acc)

    docs = list(task.test["document"])
    mine = list(range(rank, len(docs), world))
    preds: list[tuple[int, str]] = []
    with torch.no_grad():
        for i in range(0, len(mine), args.batch_size * 2):
            rows = mine[i : i + args.batch_size * 2]
            enc = encode_sources([docs[r] for r in rows])
            out = model.generate(**enc, max_new_tokens=args.max_target, num_beams=args.num_beams, do_sample=False)
            preds.extend(zip(rows, tok.batch_decode(out, skip_special_tokens=True)))
    everything = gather_object(preds) if world > 1 else preds
    if not acc.is_main_process:
        return None, {}
    ordered = [text for _, text in sorted(everything)]
    return ordered, {
        "loss": {"final": outcome.final_loss, "curve": [list(x) for x in outcome.losses]},
        "resumed_from": outcome.resumed_from,
        "s_per_step": outcome.s_per_step,
        "world_size": world,
    }


if __name__ == "__main__":
    main()
