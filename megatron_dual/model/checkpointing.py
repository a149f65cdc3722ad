"""Activation checkpointing (``train.activation_checkpointing``), applied to a built model from outside.

``full`` recomputes every transformer block in backward (only the block inputs are kept); ``selective`` recomputes
the MLP of every block (its 2 x intermediate-wide SwiGLU activations, the largest per token) and keeps attention's.
Recomputation is deterministic on CPU, so losses and gradients are bit-identical to ``none``; parameter names and
checkpoints do not change. Used by both engines.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")

__all__ = ["ACTIVATION_CHECKPOINTING", "apply_activation_checkpointing"]


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # inference and evaluation: nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """Wrap the forward of every block (``full``) or every block's MLP (``selective``); the wrapped modules."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing = {mode!r}: one of {', '.join(ACTIVATION_CHECKPOINTING)}")
    if mode == "none":
        return []
    blocks = list(getattr(model, "layers", []))
    targets = blocks if mode == "full" else [b.mlp for b in blocks]
    for module in targets:
        module.forward = functools.partial(_checkpointed, module.forward)
    return targets
