"""Fused SwiGLU activation on the fused up projection ``[up; gate]`` (``megatron_dual.model.transformer.SwiGLU``).

``x`` has shape (..., 2I): the first half is ``up``, the second ``gate``; ``out = up * silu(gate)`` of shape (..., I).
Forward and backward are single passes in fp32 registers; the backward recomputes ``silu(gate)`` instead of storing
it, so only the input is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["SwiGLUFunction", "swiglu", "FusedSwiGLUActivation"]

_BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    up = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    out = up * gate * tl.sigmoid(gate)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, x_ptr, dx_ptr, stride_do, stride_x, stride_dx, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(dout_ptr + row * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_up = g * silu
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dx_ptr + row * stride_dx + cols, d_up.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dx_ptr + row * stride_dx + n_cols + cols, d_gate.to(dx_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return n_rows, triton.cdiv(n_cols, min(_BLOCK, triton.next_power_of_2(n_cols)))


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if x.shape[-1] % 2:
            raise ValueError(f"SwiGLU input's last dimension must be even ([up; gate]), got {x.shape[-1]}")
        x2 = _rows(x)
        n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
        out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        if n_rows and n_cols:
            block = min(_BLOCK, triton.next_power_of_2(n_cols))
            _swiglu_fwd_kernel[_grid(n_rows, n_cols)](x2, out, x2.stride(0), out.stride(0), n_cols, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        (x2,) = ctx.saved_tensors
        n_rows, n_cols = x2.shape[0], x2.shape[1] // 2
        d2 = _rows(dout)
        dx = torch.empty_like(x2)
        if n_rows and n_cols:
            block = min(_BLOCK, triton.next_power_of_2(n_cols))
            _swiglu_bwd_kernel[_grid(n_rows, n_cols)](
                d2, x2, dx, d2.stride(0), x2.stride(0), dx.stride(0), n_cols, BLOCK=block
            )
        return dx.view(ctx.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` for ``x = [up; gate]`` along the last dimension (fused forward and backward)."""
    return SwiGLUFunction.apply(x)


class FusedSwiGLUActivation(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)
