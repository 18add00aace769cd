"""The one training loop of every track and hub recipe: AdamW on a loss, a named learning-rate schedule, gradient
clipping. The recipes say what is trained (a LoRA, a UNet, a vision tower) and on which batches; this says how.

    losses = train(params, loss_of_step, Training(steps=150, lr=1e-3, batch_size=8, warmup_steps=10))

Schedules (factor on lr at step s of S, warmup w):
    linear_warmup_decay   (s + 1) / w while s < w, then 1 − 0.9 (s − w) / (S − w): down to 10 % at the end
    cosine                (s + 1) / w while s < w, then 0.1 + 0.9 · ½ (1 + cos(π (s − w) / (S − w)))
    ramped_linear_decay   min(1, (s + 1) / w) · (1 − 0.9 s / S): a warmup ramp on a decay over all S steps
    constant              min(1, (s + 1) / w) (1 without warmup)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

Schedule = Literal["linear_warmup_decay", "cosine", "ramped_linear_decay", "constant"]
SCHEDULES: tuple[str, ...] = Schedule.__args__


@dataclass(frozen=True)
class Training:
    """How one model is trained: steps of `batch_size` examples, AdamW at peak `lr` on `schedule`, seeded."""

    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 20
    schedule: Schedule = "linear_warmup_decay"
    weight_decay: float = 0.0
    max_norm: float | None = 1.0  # gradient-norm clipping (None: none)
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.warmup_steps < 0:
            raise ValueError(f"steps and batch_size must be >= 1, lr > 0, warmup_steps >= 0: {self}")


@dataclass(frozen=True)
class LoraTraining(Training):
    """Training of a LoRA: its rank, lora_alpha (scale s = alpha / rank) and the modules it adapts."""

    rank: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | str = ("query", "value")


def lr_factor(schedule: str, step: int, steps: int, warmup: int) -> float:
    """The multiplier of the peak learning rate at `step` (0-based) of `steps` (module docstring)."""
    if schedule == "ramped_linear_decay":
        return min(1.0, (step + 1) / warmup) * (1 - 0.9 * step / steps)
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)


def train(params, loss_of_step: Callable[[int], torch.Tensor], settings: Training, desc: str = "train",
          progress: bool = False, log_every: int = 0, on_step: Callable[[int, float], bool | None] | None = None,
          max_seconds: float | None = None) -> list[float]:
    """`settings.steps` updates of `params`; returns the loss of every step.

    loss_of_step(step) builds a batch and returns its loss (the caller sets train / eval mode). Each step: zero
    the gradients, backward, clip their norm to settings.max_norm, AdamW step, schedule step. log_every > 0 prints
    the mean loss of the last log_every steps (a log without progress bar); on_step(step, loss) returning True,
    or running past max_seconds, stops early."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(settings.schedule, s, settings.steps, settings.warmup_steps))
    losses, start = [], time.perf_counter()
    bar = tqdm(range(settings.steps), desc=desc, disable=not progress or bool(os.environ.get("TQDM_DISABLE")))
    for step in bar:
        loss = loss_of_step(step)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss in {desc}; lower the learning rate (or load in float32)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.max_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log_every and len(losses) % log_every == 0:
            print(f"{desc}: step {len(losses)}/{settings.steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if (on_step and on_step(step, losses[-1])) or (max_seconds and time.perf_counter() - start > max_seconds):
            break
    return losses
