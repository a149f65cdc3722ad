"""Loss at labelled positions only: the head runs on the selected hidden states, not on the whole sequence
(except with the fused kernel when nearly every position is labelled: then on all, unlabelled ones weighing 0).

:func:`labelled_loss` is the one loss entry point of training and validation, for the plain head and for the
vocab-parallel head alike (``megatron_dual.parallel.layers.VocabParallelLMHead``): row selection, the empty case,
the fused-kernel dispatch and chunking are shared; what differs per head is one chunk's sums, which a head may
provide as ``chunk_sums(h, y, w, z_loss)`` (the vocab-parallel head does; the plain head uses
:func:`plain_chunk_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_dual.model.fused import use_triton

IGNORE = -100  # label of a position that predicts nothing (PyTorch's cross-entropy default)

# Labelled share of the positions from which the fused head runs on every position (unlabelled ones weigh 0)
# instead of on the gathered labelled rows. AR labels every position but the last of each document (about 99% at
# 2,048 tokens): there the gather (a nonzero() that waits for the device, an index_select, a scatter of the
# gradient in backward) costs more than the head's extra rows, at most 1 / 0.9 - 1 = 11% more head work. MD
# labels about half of the positions and keeps the gather.
ALL_ROWS_FRACTION = 0.9


@dataclass
class LossSums:
    weighted: torch.Tensor  # sum_i w_i * (nll_i + z * lse_i^2): the quantity that is back-propagated
    nll: torch.Tensor  # sum_i w_i * nll_i (detached), for metrics
    z: torch.Tensor  # sum_i w_i * lse_i^2 (detached)
    correct: torch.Tensor  # number of labelled positions predicted right (detached)
    count: int  # number of labelled positions


def _group_size(group: Any) -> int:
    import torch.distributed as dist

    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def plain_chunk_sums(
    head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, z_loss: float
) -> LossSums:
    """Sums of one chunk of selected rows through the whole (unsharded) head, logits upcast to fp32."""
    logits = head(h).float()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, y[:, None]).squeeze(1)
    weighted = (w * (nll + z_loss * lse.square())).sum()
    with torch.no_grad():
        return LossSums(
            weighted, (w * nll).sum(), (w * lse.square()).sum(), (logits.argmax(-1) == y).sum(), int(y.numel())
        )


def _check_rows(hidden: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")


def select_labelled(
    hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(h, y, w)``: the hidden rows, labels and fp32 weights of the labelled positions; None when there are none."""
    _check_rows(hidden, labels)
    flat = labels.reshape(-1)
    idx = (flat != IGNORE).nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return None
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)
    return h, flat.index_select(0, idx), weights.reshape(-1).index_select(0, idx).float()


def host_labelled_count(labels: torch.Tensor, n_labelled: int | None = None) -> int | None:
    """Labelled positions where known without reading the device: ``n_labelled`` when given (the loader counts
    them on the host, ``ObjectiveBatch.n_labelled``), else counted when ``labels`` is on the CPU, else None."""
    if n_labelled is not None:
        return int(n_labelled)
    if labels.device.type == "cpu":
        return int((labels != IGNORE).sum())
    return None


def labelled_loss(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    z_loss: float,
    tp_group: Any = None,
    chunk_size: int = 8192,
    n_labelled: int | None = None,
) -> LossSums:
    """Weighted cross-entropy + z-loss summed over positions with ``labels != -100`` (same sums on every TP rank).

    ``head``: an ``LMHead`` or a ``VocabParallelLMHead`` (``tp_group`` defaults to the head's own group; a plain
    head with a TP group of more than one rank is an error). ``hidden`` (B, T, H), or (B, T/tp, H) for a sequence-
    parallel head (gathered here); ``labels``/``weights`` (B, T). Logits exist only for labelled positions, one chunk
    of ``chunk_size`` rows at a time; the fused linear + cross-entropy kernel (when ``head.fused_ops`` selects
    triton, see ``model/fused.py``) replaces the chunk loop and keeps no logits for backward. ``n_labelled``: the
    number of labelled positions when the caller knows it on the host (``ObjectiveBatch.n_labelled``); with the
    fused kernel and a labelled share of at least :data:`ALL_ROWS_FRACTION` the head then runs on every position
    (unlabelled ones weigh 0) and nothing is gathered. Without it, labels on a GPU keep the gather (counting them
    would wait for the device).
    """
    group = tp_group if tp_group is not None else getattr(head, "tp_group", None)
    tp = _group_size(group)
    if tp > 1 and not hasattr(head, "chunk_sums"):
        raise TypeError(
            "labelled_loss with a tensor-parallel group needs a VocabParallelLMHead "
            f"(megatron_dual.parallel.layers); got {type(head).__name__}"
        )
    if hasattr(head, "gather_hidden"):
        hidden = head.gather_hidden(hidden)
    _check_rows(hidden, labels)
    fused = use_triton(getattr(head, "fused_ops", "none"), hidden)
    group = group if tp > 1 else None
    count = host_labelled_count(labels, n_labelled) if fused else None
    if count and count >= ALL_ROWS_FRACTION * labels.numel():
        h = hidden.reshape(-1, hidden.shape[-1])
        return _fused(head, h, labels.reshape(-1), weights.reshape(-1).float(), z_loss, group, count)
    rows = select_labelled(hidden, labels, weights)
    if rows is None:
        zero = hidden.sum() * 0.0
        return LossSums(zero, zero.detach(), zero.detach(), zero.detach(), 0)
    h, y, w = rows
    if fused:
        return _fused(head, h, y, w, z_loss, group, int(y.numel()))
    return _chunked(head, h, y, w, z_loss, chunk_size)


def _fused(
    head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, z_loss: float, group: Any, count: int
) -> LossSums:
    """The fused linear + CE kernel over rows ``h`` (unlabelled ones, ``y == IGNORE``, contribute nothing)."""
    from megatron_dual.kernels.cross_entropy import fused_linear_cross_entropy

    fused = fused_linear_cross_entropy(head.features(h), head.out.weight, head.out.bias, y, w, z_loss, group=group)
    return LossSums(fused.weighted, fused.nll, fused.z, fused.correct, count)


def _chunked(
    head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, z_loss: float, chunk_size: int
) -> LossSums:
    chunk = getattr(head, "chunk_sums", None) or (lambda *a: plain_chunk_sums(head, *a))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    nll = torch.zeros((), dtype=torch.float32, device=h.device)
    z = torch.zeros((), dtype=torch.float32, device=h.device)
    correct = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        sums = chunk(h[sl], y[sl], w[sl], z_loss)
        total = total + sums.weighted
        with torch.no_grad():
            nll += sums.nll
            z += sums.z
            correct += sums.correct
    return LossSums(total, nll, z, correct, int(y.numel()))


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, z_loss: float) -> torch.Tensor:
    """Unfused reference on full logits (tests only): sum_i w_i * (nll_i + z * lse_i^2)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE
    nll = F.cross_entropy(logits[keep], y[keep], reduction="none")
    lse = torch.logsumexp(logits[keep], dim=-1)
    return (weights.reshape(-1)[keep].float() * (nll + z_loss * lse.square())).sum()
