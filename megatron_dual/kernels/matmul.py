"""fp32 accumulation of 16-bit matrix products (weight gradients), shared by the fused CE and the trunk's linears.

Plain torch, no Triton: importable on any machine (``megatron_dual.model.precision`` uses it on the CPU path too).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["fp32_out_addmm", "addmm_fp32_"]


@functools.cache
def fp32_out_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds the 16-bit product ``a @ b`` to the
    fp32 ``acc`` in place on ``device``: CUDA builds of recent torch have ``addmm.dtype_out``; its first versions
    wanted ``acc`` in the 16-bit dtype, and CPU builds have no kernel for it. Tried once per device and dtype on a
    small exact product (one host read)."""
    if device.type != "cuda" or not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    a = torch.arange(6, device=device, dtype=dtype).reshape(3, 2)
    acc = torch.full((2, 2), 0.5, device=device)
    try:
        torch.addmm(acc, a.t(), a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.equal(acc, torch.tensor([[20.5, 26.5], [26.5, 35.5]], device=device)))


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool = True) -> None:
    """``acc`` (fp32) += ``a @ b``. fp32 operands: in place. 16-bit ones: in the GEMM's fp32 output where
    :func:`fp32_out_addmm` says torch allows it and ``fp32_out`` asks for it (no 16-bit product, no upcast copy, no
    separate add, one rounding fewer), else the 16-bit product added (upcast exactly)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fp32_out and acc.is_contiguous() and fp32_out_addmm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()
