"""Autograd-aware collectives between the replicated and the tensor-parallel (TP) regions.

Every function takes the TP process group as an argument (``None``, or a group of one, makes it the identity):
there is no module-level group. The pairs are conjugate, forward of one is backward of the other:

==============================  ==============================  ==============================
function                        forward                         backward
==============================  ==============================  ==============================
copy_to_tp_region               identity                        all-reduce
reduce_from_tp_region           all-reduce                      identity
scatter_to_tp_region            keep own chunk of ``dim``       all-gather along ``dim``
gather_from_tp_region           all-gather along ``dim``        keep own chunk of ``dim``
scatter_to_sp_region            keep own chunk of ``dim``       all-gather along ``dim``
gather_from_sp_region           all-gather along ``dim``        reduce-scatter (or own chunk)
reduce_scatter_to_sp_region     reduce-scatter along ``dim``    all-gather along ``dim``
==============================  ==============================  ==============================

The ``*_tp_region`` functions split along the last dimension by default (features / vocabulary), the
``*_sp_region`` (sequence-parallel) ones along dimension 1, the sequence dimension of our (batch, seq, hidden)
activations. ``gather_from_sp_region(..., tensor_parallel_output_grad=True)`` is for a gather feeding a TP region
(whose input gradient is a partial sum per rank: reduce-scatter it); ``False`` for one feeding replicated
computation (every rank holds the full gradient: keep the own chunk).

Gloo has no reduce-scatter: on it the reduce-scatter is an all-reduce followed by taking the own chunk (same
result, ``tp`` times the traffic; CPU tests only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.parallel.state import group_rank, group_size

__all__ = [
    "copy_to_tp_region",
    "reduce_from_tp_region",
    "scatter_to_tp_region",
    "gather_from_tp_region",
    "scatter_to_sp_region",
    "gather_from_sp_region",
    "reduce_scatter_to_sp_region",
    "all_reduce",
    "all_gather_along",
    "split_along",
    "reduce_scatter_along",
]


# ------------------------------------------------------------------------------------------------ plain collectives
def all_reduce(x: torch.Tensor, group: Any, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduced copy of ``x`` over ``group`` (``x`` itself when the group has one rank)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def split_along(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim`` (which must divide evenly by the group size)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} into {n} tensor-parallel chunks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def all_gather_along(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Concatenation along ``dim`` of ``x`` from every rank of ``group``, in group-rank order."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Sum of ``x`` over ``group``, of which this rank keeps its chunk along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dimension {dim} of size {x.shape[dim]} over {n} ranks")
    if dist.get_backend(group) == "gloo":  # gloo implements no reduce_scatter
        return split_along(all_reduce(x, group), group, dim)
    inputs = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


# ------------------------------------------------------------------------------------------------ autograd functions
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):  # type: ignore[override]
        ctx.group, ctx.dim = group, dim
        return split_along(x, group, dim)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return all_gather_along(g, ctx.group, ctx.dim), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):  # type: ignore[override]
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather_along(x, group, dim)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if ctx.reduce_grad:
            return reduce_scatter_along(g, ctx.group, ctx.dim), None, None, None
        return split_along(g, ctx.group, ctx.dim), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):  # type: ignore[override]
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_along(x, group, dim)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return all_gather_along(g, ctx.group, ctx.dim), None, None


def _trivial(group: Any) -> bool:
    return group_size(group) == 1


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter a TP region: identity forward, gradients all-reduced over ``group`` backward."""
    return x if _trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    return x if _trivial(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` forward; all-gather the gradient backward."""
    return x if _trivial(group) else _Scatter.apply(x, group, dim)


def gather_from_tp_region(x: torch.Tensor, group: Any, dim: int = -1) -> torch.Tensor:
    """All-gather along ``dim`` forward; keep this rank's chunk of the gradient backward."""
    return x if _trivial(group) else _Gather.apply(x, group, dim, False)


def scatter_to_sp_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """Split the sequence dimension over the TP ranks (forward); all-gather the gradient (backward)."""
    return x if _trivial(group) else _Scatter.apply(x, group, dim)


def gather_from_sp_region(
    x: torch.Tensor, group: Any, dim: int = 1, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence dimension (forward). Backward: reduce-scatter when the consumer is a TP region
    (partial gradients per rank), else keep the own chunk of the (replicated) gradient."""
    return x if _trivial(group) else _Gather.apply(x, group, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sp_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """Sum partial results and keep this rank's chunk of the sequence (forward); all-gather backward."""
    return x if _trivial(group) else _ReduceScatter.apply(x, group, dim)
