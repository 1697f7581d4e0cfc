"""The training loop every training script shares: checkpoints, preemption, exact resume.

    outcome = train(model, step_loss, spec, out, config, accelerator=None)

- Checkpoints go to {out}/checkpoint.pt every `ckpt_every` steps, when the preempt signal
  (gpupack.job.on_preempt: SIGUSR2 by default, or SIGTERM) arrives, and at the end. Each is
  written atomically (a kill mid-save keeps the previous one). They hold the trainable
  parameters only (a frozen 8B sender is rebuilt from --seed or the hub, not saved), the
  optimizer, the RNG states, the loss history and a digest of the config.
- On the preempt signal the loop finishes the step it is in, checkpoints, logs
  "preempted at step N" and exits with 128 + the signal's number.
- With GPUPACK_RESUME=1 (gpupack sets it after an interruption) or --resume, it loads the
  checkpoint, logs "resumed from step N" and carries on. Batches are a function of the step
  (common.batch_indices) and the RNG states are restored, so the resumed run computes what
  the uninterrupted run would have (tests/test_experiments.py checks this bit for bit on
  the CPU). A checkpoint from another config is ignored, with a line saying so.
- With an accelerate Accelerator (DDP over several GPUs), only the main process writes and
  the stop decision is all-reduced each step, so every rank stops at the same step instead
  of one rank waiting forever in an all-reduce.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import log
from gpupack import job

CHECKPOINT = "checkpoint.pt"
WARMUP_STEPS = 3  # not timed: CUDA allocations and kernel selection happen in the first steps
# Arguments that do not change what step N computes: a resumed attempt may differ in them.
# The learning rate does not depend on the total number of steps, so a run can be extended
# by resuming it with a larger --steps.
NOT_SEMANTIC = frozenset({"out", "resume", "steps", "ckpt_every", "log_every", "device", "threads"})


@dataclass(frozen=True)
class LoopSpec:
    steps: int
    lr: float
    warmup: int
    ckpt_every: int
    log_every: int
    resume: bool  # --resume or GPUPACK_RESUME=1
    weight_decay: float = 0.01
    clip_norm: float = 1.0

    @classmethod
    def from_args(cls, args: Any) -> LoopSpec:
        return cls(args.steps, args.lr, args.warmup, args.ckpt_every, args.log_every, args.resume or job.resuming())


@dataclass(frozen=True)
class Outcome:
    resumed_from: int  # the checkpoint's step, 0 for a fresh start
    losses: tuple[tuple[int, float], ...]  # (step, mean loss since the previous log line)
    s_per_step: float | None  # mean wall time of this attempt's steps after the first 3 (warm-up)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


StepLoss = Callable[[nn.Module, int], torch.Tensor]


def config_digest(config: Mapping[str, Any]) -> str:
    semantic = {k: str(v) for k, v in config.items() if k not in NOT_SEMANTIC}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


def train(
    model: nn.Module,
    step_loss: StepLoss,
    spec: LoopSpec,
    out: Path,
    config: Mapping[str, Any],
    accelerator: Any | None = None,
) -> Outcome:
    """Run steps [start, spec.steps) of step_loss(model, step) with AdamW; see the module doc."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    ckpt_path = out / CHECKPOINT
    digest = config_digest(config)
    main = accelerator is None or accelerator.is_main_process
    say = log if main else (lambda _: None)  # one copy of each line, not one per rank
    start, history = 0, list[list[float]]()  # [step, mean loss]: plain lists load with weights_only
    if spec.resume:
        start, history = _restore(ckpt_path, digest, params, optimizer, say)
    wrapped = model
    if accelerator is not None:
        wrapped, optimizer = accelerator.prepare(model, optimizer)

    stop = threading.Event()
    job.on_preempt(stop.set)

    def save(step: int) -> None:
        if main:
            job.save_checkpoint(_state(step, params, optimizer, history, digest), ckpt_path)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    wrapped.train()
    window: list[float] = []
    timed_from: tuple[int, float] | None = None
    for step in range(start, spec.steps):
        if step == start + WARMUP_STEPS:
            timed_from = (step, time.perf_counter())
        if _should_stop(stop, accelerator):
            save(step)
            say(f"preempted at step {step}: checkpoint saved to {ckpt_path}")
            sig = job.preempt_signal()
            raise SystemExit(128 + (sig or 15))
        for group in optimizer.param_groups:
            group["lr"] = spec.lr * min(1.0, (step + 1) / max(1, spec.warmup))
        loss = step_loss(wrapped, step)
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), spec.clip_norm)
        optimizer.step()
        window.append(loss.item())
        done = step + 1
        if done % spec.log_every == 0 or done == spec.steps:
            history.append([done, sum(window) / len(window)])
            say(f"step {done}/{spec.steps} loss {history[-1][1]:.4f}")
            window.clear()
        if done % spec.ckpt_every == 0 and done < spec.steps:
            save(done)
    if start < spec.steps or not ckpt_path.exists():
        save(spec.steps)  # a kill during evaluation resumes straight into evaluation
    wrapped.eval()
    s_per_step = None
    if timed_from is not None and spec.steps > timed_from[0]:
        s_per_step = (time.perf_counter() - timed_from[1]) / (spec.steps - timed_from[0])
    return Outcome(start, tuple((int(s), float(v)) for s, v in history), s_per_step)


def _should_stop(stop: threading.Event, accelerator: Any | None) -> bool:
    if accelerator is None or accelerator.num_processes == 1:
        return stop.is_set()
    flag = torch.tensor([1.0 if stop.is_set() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _state(step: int, params: Mapping[str, nn.Parameter], optimizer: Any, history: list, digest: str) -> dict[str, Any]:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "step": step,
        "params": {name: p.detach().cpu() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng,
        "history": [list(h) for h in history],
        "config_digest": digest,
    }


def _restore(
    path: Path, digest: str, params: Mapping[str, nn.Parameter], optimizer: Any, say: Callable[[str], None]
) -> tuple[int, list]:
    state = job.load_checkpoint(path)
    if state is None:
        say(f"no checkpoint at {path}: starting from step 0")
        return 0, []
    if state.get("config_digest") != digest or set(state["params"]) != set(params):
        say(f"checkpoint at {path} is from another config: ignoring it, starting from step 0")
        return 0, []
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    cuda_rng = state["rng"].get("cuda")
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    say(f"resumed from step {state['step']}")
    return int(state["step"]), [list(h) for h in state["history"]]
