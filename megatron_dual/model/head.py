"""The reference output head: RMSNorm -> Linear(h, h) -> GELU(tanh) -> Linear(h, vocab, bias)."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_dual.model.fused import RMSNorm


def trunc_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class LMHead(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, eps: float, fused_ops: str = "none") -> None:
        super().__init__()
        self.fused_ops = fused_ops  # "triton"/"auto": labelled_loss uses the fused output linear + CE kernel
        self.norm = RMSNorm(hidden_size, eps, fused_ops)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, vocab_size, bias=True)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        h, v = self.proj.in_features, self.out.out_features
        self.norm.reset_parameters()
        trunc_normal_(self.proj.weight, math.sqrt(2.0 / (5 * h)))
        trunc_normal_(self.out.weight, math.sqrt(2.0 / (h + v)))
        self.out.bias.zero_()

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.proj(self.norm(hidden)), approximate="tanh")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(hidden))
