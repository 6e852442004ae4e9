"""A small resumable training loop shared by the drafter trainers.

Output folder:
  checkpoint.pt   {"model", "optimizer", "step", "extra"}: written atomically every
                  `save_every` steps and at the end; a run finding one resumes from its step.
  loss.jsonl      one line per logged step: {"step", "loss", "lr", "elapsed_s", **metrics}.
Batches come from `batch_at(step)`, a pure function of the step, so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class LoopConfig:
    output: str
    steps: int
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    save_every: int = 100
    log_every: int = 5
    max_minutes: float | None = None  # stop early (and save) after this much wall time
    stop_at: int | None = None  # stop at this step; the lr schedule still spans `steps`
    progress: bool = True


# command-line options every trainer shares, and the Config fields they set
LOOP_FIELDS = ("steps", "stop_at", "batch_size", "lr", "seed", "save_every", "max_minutes")


def add_loop_arguments(p, defaults) -> None:
    """--steps ... --no-bf16 on a trainer's parser; `defaults` is its Config with default values."""
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step; the learning-rate schedule still spans --steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--save-every", type=int, default=defaults.save_every)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--no-bf16", action="store_true", help="train without bfloat16 autocast")


def loop_settings(args) -> dict:
    """The Config fields add_loop_arguments' options set."""
    return {**{n: getattr(args, n) for n in LOOP_FIELDS}, "bf16_autocast": not args.no_bf16}


def lr_at(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def checkpoint_path(output: str) -> str:
    return os.path.join(output, "checkpoint.pt")


def train_loop(model: torch.nn.Module, batch_at: Callable[[int], object],
               loss_fn: Callable[[torch.nn.Module, object], tuple[torch.Tensor, dict]],
               cfg: LoopConfig, extra: dict | None = None) -> int:
    """Run (or resume) training to cfg.steps; returns the step reached.  `extra` is saved in the
    checkpoint (e.g. the draft vocabulary) and checked to match on resume."""
    os.makedirs(cfg.output, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step = _resume(model, opt, cfg.output, extra)
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    log = open(os.path.join(cfg.output, "loss.jsonl"), "a")
    try:
        model.train()
        last = min(cfg.steps, cfg.stop_at or cfg.steps)
        while step < last:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss, metrics = loss_fn(model, batch_at(step))
            metrics = {k: float(v) for k, v in metrics.items()}
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            elapsed = time.perf_counter() - start
            if step % cfg.log_every == 0 or step == last:
                row = {"step": step, "loss": round(float(loss.detach()), 5), "lr": lr_at(step - 1, cfg),
                       "elapsed_s": round(elapsed, 2),
                       **{k: round(float(v), 5) for k, v in metrics.items()}}
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            out_of_time = cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60
            if step % cfg.save_every == 0 or step == last or out_of_time:
                save_checkpoint(model, opt, step, cfg.output, extra)
            if out_of_time:
                break
    finally:
        log.close()
        bar.close()
    model.eval()
    return step


def save_checkpoint(model, opt, step: int, output: str, extra: dict | None) -> None:
    path = checkpoint_path(output)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def _resume(model, opt, output: str, extra: dict | None) -> int:
    path = checkpoint_path(output)
    if not os.path.isfile(path):
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot resume ({type(e).__name__}); delete it or pick "
                         f"another --output") from e
    for key, value in (extra or {}).items():
        old = state.get("extra", {}).get(key)
        tensors = isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor)
        same = (old.shape == value.shape and torch.equal(old, value)) if tensors else old == value
        if not same:
            raise ValueError(f"{path}: saved with another {key}; pick another --output to start over")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except Exception as e:
        raise ValueError(f"{path}: cannot resume ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"delete it or pick another --output") from e
    return int(state["step"])


def load_checkpoint_model(model: torch.nn.Module, output: str) -> int:
    """Load only the weights of output/checkpoint.pt into model; returns its step."""
    state = torch.load(checkpoint_path(output), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return int(state["step"])
