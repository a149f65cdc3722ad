"""Vocab-parallel cross-entropy with z-loss, without gathering the logits (the plain-PyTorch path).

Each TP rank holds the logits of its vocabulary shard ``[vocab_start, vocab_start + V/tp)``. Per token:

    m     = max over shards of the local max            (all-reduce MAX)
    S     = sum over shards of sum_j exp(logit_j - m)   (all-reduce SUM)
    x_y   = the target's logit, from the shard that owns it, 0 elsewhere (all-reduce SUM, fused with S)
    lse   = log S + m,   nll = lse - x_y

Backward needs no communication: d nll / d logit_j = softmax_j - [j == y], d lse / d logit_j = softmax_j, each rank
for its own j. ``correct`` (argmax == label) takes the global argmax with torch's tie rule (first index): the
smallest global index whose logit equals the global max (all-reduce MIN).

:func:`vocab_parallel_loss_sums` is one chunk's sums for
:class:`~megatron_dual.parallel.layers.VocabParallelLMHead` (its ``chunk_sums``), run by the one loss entry point
:func:`megatron_dual.model.loss.labelled_loss`. The fused Triton linear + CE kernel (``kernels/cross_entropy.py``,
vocab-parallel variant) is used instead when the head's ``fused_ops`` selects triton; this module is the reference
it is tested against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.model.loss import IGNORE, LossSums
from megatron_dual.parallel.mappings import all_reduce
from megatron_dual.parallel.state import group_rank, group_size

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_argmax", "vocab_parallel_loss_sums"]


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):  # type: ignore[override]
        n_local = logits.shape[-1]
        local_max = logits.max(dim=-1).values
        m = all_reduce(local_max.detach(), group, dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        local_t = target - vocab_start
        own = (local_t >= 0) & (local_t < n_local)
        idx = torch.where(own, local_t, torch.zeros_like(local_t))
        target_shifted = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~own, 0.0)
        exp = shifted.exp()
        stats = torch.stack([exp.sum(dim=-1), target_shifted])  # one all-reduce for both
        stats = all_reduce(stats, group)
        sum_exp, target_shifted = stats[0], stats[1]
        log_z = sum_exp.log()
        lse = log_z + m
        ignored = target == IGNORE
        nll = (log_z - target_shifted).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, own & ~ignored)
        return nll, lse

    @staticmethod
    def backward(ctx, g_nll, g_lse):  # type: ignore[override]
        softmax, idx, own = ctx.saved_tensors
        grad = softmax * (g_nll + g_lse).unsqueeze(-1)
        grad.scatter_add_(-1, idx.unsqueeze(-1), (-g_nll * own).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, tp_group: Any, vocab_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(nll, lse)`` of the full-vocabulary softmax from this rank's logit shard.

    ``logits`` (..., V/tp) (upcast to fp32), ``target`` (...) global ids or ``IGNORE`` (-100: nll 0, no gradient
    from nll). ``vocab_start`` defaults to ``tp_rank * V/tp``. Both outputs are differentiable.
    """
    if vocab_start is None:
        vocab_start = group_rank(tp_group) * logits.shape[-1]
    return _VocabParallelCE.apply(logits.float(), target, int(vocab_start), tp_group)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, tp_group: Any, vocab_start: int | None = None) -> torch.Tensor:
    """Global argmax ids (first index on ties, as ``torch.argmax``) from this rank's logit shard."""
    if vocab_start is None:
        vocab_start = group_rank(tp_group) * logits.shape[-1]
    local_max, local_idx = logits.max(dim=-1)
    if group_size(tp_group) == 1:
        return local_idx + vocab_start
    m = all_reduce(local_max, tp_group, dist.ReduceOp.MAX)
    big = torch.iinfo(torch.int64).max
    none = torch.full_like(local_idx, big, dtype=torch.long)
    cand = torch.where(local_max == m, local_idx.long() + vocab_start, none)
    return all_reduce(cand, tp_group, dist.ReduceOp.MIN)


def vocab_parallel_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    z_loss: float,
    tp_group: Any,
    vocab_start: int | None = None,
) -> LossSums:
    """:class:`LossSums` of rows ``logits`` (N, V/tp) against ``labels`` (N,) with per-row ``weights`` (N,).

    weighted = sum_i w_i (nll_i + z lse_i^2) over rows with a label (differentiable); nll, z, correct detached.
    """
    keep = labels != IGNORE
    nll, lse = vocab_parallel_cross_entropy(logits, labels, tp_group, vocab_start)
    w = torch.where(keep, weights.float(), torch.zeros((), dtype=torch.float32, device=weights.device))
    z_term = torch.where(keep, lse.square(), torch.zeros_like(lse))
    total = (w * (nll + z_loss * z_term)).sum()
    with torch.no_grad():
        pred = vocab_parallel_argmax(logits.detach(), tp_group, vocab_start)
        correct = ((pred == labels) & keep).sum().float()
        return LossSums(total, (w * nll).sum().detach(), (w * z_term).sum().detach(), correct, int(keep.sum()))
