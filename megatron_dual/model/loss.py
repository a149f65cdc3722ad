"""Loss at labelled positions only: the head runs on the selected hidden states, never on the whole sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_dual.model.fused import use_triton
from megatron_dual.model.head import LMHead

IGNORE = -100


@dataclass
class LossSums:
    weighted: torch.Tensor  # sum_i w_i * (nll_i + z * lse_i^2): the quantity that is back-propagated
    nll: torch.Tensor  # sum_i w_i * nll_i (detached), for metrics
    z: torch.Tensor  # sum_i w_i * lse_i^2 (detached)
    correct: torch.Tensor  # number of labelled positions predicted right (detached)
    count: int  # number of labelled positions


def labelled_loss(head: LMHead, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  z_loss: float, chunk_size: int = 8192) -> LossSums:
    """Weighted cross-entropy + z-loss summed over positions with ``labels != -100``.

    Logits exist only for labelled positions (an MD batch at small t labels few), upcast to fp32 one chunk of
    ``chunk_size`` positions at a time. Autograd still keeps each chunk's logits for backward; the fused
    linear + cross-entropy kernel (used when ``head.fused_ops`` selects triton, see ``model/fused.py``) is what
    removes them: it covers the head's output linear + bias, cross-entropy and z-loss, with its own chunking.
    """
    flat_labels = labels.reshape(-1)
    idx = (flat_labels != IGNORE).nonzero(as_tuple=True)[0]
    count = int(idx.numel())
    if count == 0:
        zero = hidden.sum() * 0.0
        return LossSums(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    y = flat_labels.index_select(0, idx)
    w = weights.reshape(-1).index_select(0, idx).float()
    if use_triton(getattr(head, "fused_ops", "none"), h):
        from megatron_dual.kernels.cross_entropy import fused_linear_cross_entropy

        fused = fused_linear_cross_entropy(head.features(h), head.out.weight, head.out.bias, y, w, z_loss)
        return LossSums(fused.weighted, fused.nll, fused.z, fused.correct, count)
    total = h.new_zeros((), dtype=torch.float32)
    nll_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    z_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, count, chunk_size):
        sl = slice(start, start + chunk_size)
        logits = head(h[sl]).float()
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(1, y[sl, None]).squeeze(1)
        per_token = nll + z_loss * lse.square()
        total = total + (w[sl] * per_token).sum()
        with torch.no_grad():
            nll_sum += (w[sl] * nll).sum()
            z_sum += (w[sl] * lse.square()).sum()
            correct += (logits.argmax(-1) == y[sl]).sum()
    return LossSums(total, nll_sum, z_sum, correct, count)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Unfused reference on full logits (tests only): sum_i w_i * (nll_i + z * lse_i^2)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE
    nll = F.cross_entropy(logits[keep], y[keep], reduction="none")
    lse = torch.logsumexp(logits[keep], dim=-1)
    return (weights.reshape(-1)[keep].float() * (nll + z_loss * lse.square())).sum()
