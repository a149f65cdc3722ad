"""Dispatch between the plain PyTorch ops and the fused Triton kernels (``megatron_dual.kernels``).

``ModelConfig.fused_ops``: ``auto`` uses the kernels on CUDA tensors (when triton imports) and PyTorch elsewhere,
``none`` never uses them, ``triton`` always does (on CPU that needs ``TRITON_INTERPRET=1``, set before triton is
first imported: the tests' mode). The decision is taken per call from the tensor's device, so one model moves
between devices freely. The kernels are imported lazily: nothing here touches triton on the CPU default path.
Parameter names are those of the unfused modules, so checkpoints load either way.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from megatron_dual.model.apex_ops import notice

FUSED_OPS = ("auto", "none", "triton", "apex")  # apex: apex's FusedRMSNorm, Triton for the rest (as auto)


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(mode: str, x: torch.Tensor) -> bool:
    """Whether the fused kernels handle ``x`` under ``mode`` (one of :data:`FUSED_OPS`)."""
    if mode == "none":
        return False
    if mode in ("auto", "apex"):
        return x.is_cuda and triton_available()
    if mode == "triton":
        if not triton_available():
            raise RuntimeError("model.fused_ops = 'triton' but triton is not installed (pip install triton)")
        if x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True
        notice(
            f"model.fused_ops = triton on a {x.device.type} tensor: the kernels need a GPU (or "
            f"TRITON_INTERPRET=1); PyTorch ops"
        )
        return False
    raise ValueError(f"model.fused_ops = {mode!r}; allowed: {', '.join(FUSED_OPS)}")


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes linears in on ``x``'s device, None outside autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same ``weight``) that runs the fused kernel when :func:`use_triton` says so; under autocast
    the kernel writes its output in the autocast dtype (statistics in fp32), which the next linear reads as is."""

    def __init__(self, hidden_size: int, eps: float, fused_ops: str = "none") -> None:
        super().__init__(hidden_size, eps=eps)
        self.fused_ops = fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops == "apex":
            from megatron_dual.model.apex_ops import apex_rms_norm, notice

            fn = apex_rms_norm() if x.is_cuda else notice("model.fused_ops = apex on a CPU tensor: PyTorch's RMSNorm")
            if fn is not None:
                return fn(x, self.weight, self.normalized_shape, self.eps or torch.finfo(x.dtype).eps)
            return super().forward(x)
        if use_triton(self.fused_ops, x):
            from megatron_dual.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.norm_eps(x), autocast_dtype(x))
        return super().forward(x)

    def norm_eps(self, x: torch.Tensor) -> float:
        return self.eps if self.eps is not None else torch.finfo(x.dtype).eps


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` and ``norm`` of it by the fused residual-add + RMSNorm kernel (``kernels.rmsnorm``): the sum
    in ``x``'s dtype (the fp32 residual stream under autocast), the normalised output in the autocast dtype."""
    from megatron_dual.kernels.rmsnorm import add_rms_norm as _add_rms_norm

    return _add_rms_norm(x, delta, norm.weight, norm.norm_eps(x), autocast_dtype(x))


def rotary_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused (B, T, (Hq + 2 Hkv) D) projection into rotated q, k and v of shape (B, H, T, D).

    The rotation runs in place on the projection's output (one kernel over all q and k heads), so q and k are
    views of ``qkv``, as in the unfused path.
    """
    from megatron_dual.kernels.rotary import rotary_qkv_

    b, t, _ = qkv.shape
    heads = rotary_qkv_(qkv, cos, sin, n_heads + n_kv, head_dim).view(b, t, n_heads + 2 * n_kv, head_dim)
    q, k, v = heads.split([n_heads, n_kv, n_kv], dim=2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` of ``x = [up; gate]`` by the fused kernel."""
    from megatron_dual.kernels.swiglu import swiglu as _swiglu

    return _swiglu(x)
