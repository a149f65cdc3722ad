"""Learning-rate schedules as pure functions of the step: multipliers in [min_lr_ratio, 1]."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from megatron_dual.config import ScheduleConfig

SCHEDULES = ("wsd", "cosine", "constant")  # schedule.name: the shapes lr_multiplier knows


def lr_multiplier(
    step: int,
    total_steps: int,
    name: str = "wsd",
    warmup_steps: int = 0,
    decay_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    wsd: linear warmup, constant, then linear decay to ``min_lr_ratio`` over the last ``decay_steps`` steps (the last
    step trains at ``min_lr_ratio + (1 - min_lr_ratio) / decay_steps``, never at exactly zero).
    cosine: linear warmup then cosine from 1 to ``min_lr_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "wsd":
        decay_start = total_steps - decay_steps
        if decay_steps <= 0 or step < decay_start:
            return 1.0
        frac = (total_steps - step) / decay_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * frac
    if name == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {name!r}; choose wsd, cosine or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``total_steps`` steps; ``cfg.decay_steps`` may be a fraction of them
    (:meth:`~megatron_dual.config.ScheduleConfig.decay_steps_for`)."""
    decay_steps = cfg.decay_steps_for(total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, cfg.name, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio),
    )


def retarget_scheduler(
    scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float], total_steps: int, cfg: ScheduleConfig
) -> None:
    """Point a restored ``scheduler`` (and its optimizer's groups) at new base lrs and a new schedule over
    ``total_steps``, keeping its step count: the lr of the next step is ``base * multiplier(step)`` of the new
    settings (loading a state dict alone keeps the old base lrs and the old lr until the next step)."""
    decay_steps = cfg.decay_steps_for(total_steps)

    def fn(step: int) -> float:
        return lr_multiplier(step, total_steps, cfg.name, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio)

    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [fn] * len(groups)
    scheduler.base_lrs = list(base_lrs)
    for group, base in zip(groups, base_lrs, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]
