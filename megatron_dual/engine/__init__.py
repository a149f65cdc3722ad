"""Engines of the training loop (:class:`~megatron_dual.engine.base.Engine`): ``ddp`` (plain torch) and
``deepspeed`` (ZeRO 0-3), chosen by ``engine.name``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["build_engine"]


def build_engine(model: torch.nn.Module, parallel: Any, cfg: Any, device: torch.device) -> Any:
    """The engine ``cfg.engine.name`` names, built around ``model`` (the Trainer's default engine factory)."""
    if cfg.engine.name == "deepspeed":
        from megatron_dual.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, parallel, cfg, device)
    from megatron_dual.engine.ddp import DDPEngine

    return DDPEngine(model, parallel, cfg, device)
