"""bf16 mixed precision the Megatron way, on fp32 parameters under ``torch.autocast``.

* :func:`step_region`: one autocast region around all the micro-batches of an optimizer step. ``torch.autocast``
  keeps the bf16 copies of the weights it casts (leaf tensors that require grad) in a cache that it drops when the
  *outermost* autocast context exits; entering and leaving autocast per micro-batch therefore re-casts every weight
  every micro-batch. The region is an outer ``torch.autocast(enabled=False)``: forwards still run in their own
  (inner) autocast contexts and backwards outside autocast, as before, but the cache now lives until the region
  ends, after the last backward and before the optimizer changes the weights. The same region bounds the weight
  cache of the fp32-accumulating linear below (entries also check the weight's version counter).
* :func:`linear`: with a weight tagged by :func:`enable_fp32_grad_accumulation` (the DDP engine does so for bf16
  on CUDA, where ``param.grad`` is an fp32 view into an all-reduce bucket), the weight gradient of a bf16 linear is
  one matmul with fp32 output accumulated straight into ``param.grad``:
  ``torch.addmm(grad, dy^T, x, out_dtype=torch.float32, out=grad)`` (Megatron's gradient-accumulation fusion;
  :mod:`megatron_dual.kernels.matmul`, shared with the fused CE), instead of a bf16 product that autograd casts to
  fp32 and adds in two more passes. Where ``addmm`` has no ``out_dtype`` (CPU; torch before 2.8) the bf16 product
  is added in place (the floats of the autocast path). Autograd then receives no weight gradient; the weight's
  post-accumulate-grad hooks (the gradient buckets' readiness) still run once per backward: torch 2.13 runs them
  for a None gradient too, and where a torch does not (feature-tested once) the function runs them itself. Not
  for engines that manage gradients themselves (DeepSpeed hooks autograd's accumulation nodes): only the tagged
  weights take this path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dual.kernels.matmul import addmm_fp32_, fp32_out_addmm
from megatron_dual.model.fused import autocast_dtype

__all__ = ["Linear", "enable_fp32_grad_accumulation", "linear", "step_region"]

FP32_GRAD_ATTR = "fp32_grad_accumulation"
_cache: dict[int, tuple[torch.Tensor, int, torch.Tensor]] | None = None  # id -> (weight, version, low-precision copy)


@contextmanager
def step_region(device_type: str, enabled: bool = True) -> Iterator[None]:
    """The optimizer step's region: weight casts (autocast's and :func:`linear`'s) are kept until it ends."""
    global _cache
    if not enabled:
        yield
        return
    outer = _cache is None
    if outer:
        _cache = {}
    try:
        with torch.autocast(device_type, enabled=False):  # one nesting level: inner exits keep autocast's cache
            yield
    finally:
        if outer:
            _cache = None


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype`` without autograd history, cached within :func:`step_region`."""
    if _cache is None:
        return weight.detach().to(dtype)
    hit = _cache.get(id(weight))
    if hit is not None and hit[0] is weight and hit[1] == weight._version and hit[2].dtype == dtype:
        return hit[2]
    low = weight.detach().to(dtype)
    _cache[id(weight)] = (weight, weight._version, low)
    return low


class _NoWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 1.0

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        return dy, None


@functools.cache
def autograd_runs_hooks_without_grad() -> bool:
    """Whether autograd runs a leaf's post-accumulate-grad hooks when a function returned None as its gradient
    (torch 2.13 does); if not, :func:`accumulate_weight_grad` runs them itself. Either way: once per backward."""
    calls: list[int] = []
    w = torch.zeros(1, requires_grad=True)
    w.register_post_accumulate_grad_hook(lambda _: calls.append(1))
    with torch.enable_grad():
        _NoWeightGrad.apply(torch.ones(1, requires_grad=True), w).sum().backward()
    return bool(calls)


def _run_post_accumulate_hooks(param: torch.Tensor) -> None:
    # the hooks registered with Tensor.register_post_accumulate_grad_hook, which autograd's accumulation would run
    if autograd_runs_hooks_without_grad():
        return
    hooks = getattr(param, "_post_accumulate_grad_hooks", None)
    for hook in list(hooks.values()) if hooks else []:
        hook(param)


def accumulate_weight_grad(weight: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """``weight.grad += dy^T x`` (2-D ``dy``, ``x`` in the low precision) with fp32 accumulation, then the hooks."""
    grad = weight.grad
    if grad is None:
        grad = weight.grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    addmm_fp32_(grad, dy.t(), x)
    _run_post_accumulate_hooks(weight)


class _Fp32GradLinear(torch.autograd.Function):
    """``x W^T`` in ``dtype``; backward: ``dx`` as autocast's, ``W``'s gradient accumulated into ``W.grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        x_low, w_low = x.to(dtype), _cast(weight, dtype)
        ctx.save_for_backward(x_low, w_low, weight)  # weight: a leaf, saved to check it is not changed before backward
        # the parameter itself, for its .grad: under activation checkpointing the saved tensors come back from the
        # recomputation as detached aliases, whose .grad is not the parameter's (the gradient would be lost)
        ctx.param = weight
        ctx.x_dtype = x.dtype
        return F.linear(x_low, w_low)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x_low, w_low, _ = ctx.saved_tensors
        dy = dy.to(w_low.dtype)
        dx = dy.matmul(w_low).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        accumulate_weight_grad(ctx.param, dy.reshape(-1, dy.shape[-1]), x_low.reshape(-1, x_low.shape[-1]))
        return dx, None, None


def _low_precision(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when ``weight`` takes the fp32-accumulation path for this call, else None."""
    if not getattr(weight, FP32_GRAD_ATTR, False) or weight.dtype != torch.float32:
        return None
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return None
    return autocast_dtype(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the fp32 weight-gradient accumulating linear for a tagged weight under autocast."""
    dtype = _low_precision(x, weight) if bias is None else None
    if dtype is None:
        return F.linear(x, weight, bias)
    autograd_runs_hooks_without_grad()  # (cached; run by enable_fp32_grad_accumulation) not inside a backward
    return _Fp32GradLinear.apply(x, weight, dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def enable_fp32_grad_accumulation(model: nn.Module) -> int:
    """Tag the 2-D weights of the trunk's linears (``model.layers``); the number tagged. Only weights whose
    ``.grad`` stays an fp32 tensor that the caller owns (the DDP buckets) may be tagged."""
    n = 0
    for block in getattr(model, "layers", []):
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.dtype == torch.float32:
                setattr(weight, FP32_GRAD_ATTR, True)
                fp32_out_addmm(weight.device, torch.bfloat16)  # the feature tests run now, not inside a backward
                n += 1
    autograd_runs_hooks_without_grad()
    return n
