"""Fused RMSNorm with a learnable scale: ``y = x * rsqrt(mean(x^2) + eps) * weight``, statistics in fp32.

Forward stores the per-row reciprocal RMS; backward recomputes ``x_hat`` from it and writes ``dx`` directly, while
``dweight`` is accumulated in fp32 by a fixed number of programs (each owns a contiguous block of rows) and the
per-program partial sums are reduced in torch. Any hidden size works (the row is padded to a power of two and
masked), e.g. 100, 1024 or 3554. The output may be written in another dtype than the input (the autocast dtype).

:func:`add_rms_norm` fuses the residual add in front of the norm (``x + delta``, then the norm of the sum) and, in
backward, the residual gradient behind it: one read of each operand per pass instead of an add, a norm and a cast.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["AddRMSNormFunction", "FusedRMSNorm", "RMSNormFunction", "add_rms_norm", "rms_norm"]

_MAX_FUSED_SIZE = 65536


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _norm_grads(x, dy, w, rstd, n_cols):
    """One row's input gradient of ``x * rstd(x) * w`` and its weight-gradient term (fp32 in, fp32 out)."""
    x_hat = x * rstd
    wdy = w * dy
    # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), g = w * dy
    return rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / n_cols)), dy * x_hat


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=valid, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
            dx, dw_row = _norm_grads(x, dy, w, tl.load(rstd_ptr + row), n_cols)
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=valid)
            dw_acc += dw_row
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=valid)


@triton.jit
def _add_rmsnorm_fwd_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    xo_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_d,
    stride_xo,
    stride_y,
    n_cols,
    eps,
    BLOCK: tl.constexpr,
):
    """``xo = x + d`` (in ``xo``'s dtype, the residual stream's) and ``y = rmsnorm(xo) * w`` (in ``y``'s)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + cols, mask=valid, other=0.0).to(tl.float32)
    # the statistics see the stored residual (rounded to its dtype), as the backward that reloads it does
    xo = (x + d).to(xo_ptr.dtype.element_ty)
    tl.store(xo_ptr + row * stride_xo + cols, xo, mask=valid)
    xf = xo.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * stride_y + cols, (xf * rstd * w).to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _add_rmsnorm_bwd_kernel(
    dy_ptr,
    dxo_ptr,
    xo_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dd_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_dxo,
    stride_xo,
    stride_dx,
    stride_dd,
    n_rows,
    n_cols,
    rows_per_program,
    WRITE_DD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``g = dxo + d rmsnorm/d xo (dy)``, written as the gradient of both summands (``dx``; ``dd`` only when its
    dtype differs, ``WRITE_DD``); ``dw`` accumulated per program as in :func:`_rmsnorm_bwd_kernel`."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=valid, other=0.0).to(tl.float32)
            x = tl.load(xo_ptr + row * stride_xo + cols, mask=valid, other=0.0).to(tl.float32)
            g = tl.load(dxo_ptr + row * stride_dxo + cols, mask=valid, other=0.0).to(tl.float32)
            dx, dw_row = _norm_grads(x, dy, w, tl.load(rstd_ptr + row), n_cols)
            g += dx
            tl.store(dx_ptr + row * stride_dx + cols, g.to(dx_ptr.dtype.element_ty), mask=valid)
            if WRITE_DD:
                tl.store(dd_ptr + row * stride_dd + cols, g.to(dd_ptr.dtype.element_ty), mask=valid)
            dw_acc += dw_row
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=valid)


def _block_size(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > _MAX_FUSED_SIZE:
        raise ValueError(f"fused RMSNorm supports hidden sizes up to {_MAX_FUSED_SIZE}, got {n_cols}")
    return block


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return max(1, min(n_rows, 4 * _sm_count(index)))
    return max(1, min(n_rows, 4))  # the interpreter: few programs, rows looped inside each


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        shape = x.shape
        n_cols = shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}; expected ({n_cols},)")
        x2 = x.reshape(-1, n_cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows = x2.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=out_dtype or x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = _block_size(n_cols)
        if n_rows > 0:
            _rmsnorm_fwd_kernel[(n_rows,)](
                x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block, num_warps=_num_warps(block)
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = _num_programs(n_rows, x2.device)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
        block = _block_size(n_cols)
        if n_rows > 0:
            rows_per_program = triton.cdiv(n_rows, programs)
            _rmsnorm_bwd_kernel[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_partial,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                n_rows,
                n_cols,
                rows_per_program,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
            dw = dw_partial.sum(0).to(weight.dtype)
        else:
            dw = torch.zeros_like(weight)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused RMSNorm over the last dimension; statistics in fp32, output in ``out_dtype`` (default ``x.dtype``).

    Under autocast the caller passes the autocast dtype: the next linear then reads the output as it is instead of
    casting an fp32 copy (and its backward returns ``dy`` in that dtype, which the kernel reads as it is too);
    ``dx`` always has ``x``'s dtype.
    """
    return RMSNormFunction.apply(x, weight, eps, out_dtype)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class AddRMSNormFunction(torch.autograd.Function):
    """``(x + delta, rmsnorm(x + delta) * weight)`` in one pass over the rows; see :func:`add_rms_norm`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape, n_cols = x.shape, x.shape[-1]
        if delta.shape != shape:
            raise ValueError(f"add_rms_norm: delta has shape {tuple(delta.shape)}; expected {tuple(shape)}")
        if weight.shape != (n_cols,):
            raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}; expected ({n_cols},)")
        x2, d2 = _rows(x, n_cols), _rows(delta, n_cols)
        n_rows = x2.shape[0]
        xo = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        y = torch.empty((n_rows, n_cols), dtype=out_dtype or x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = _block_size(n_cols)
        if n_rows > 0:
            _add_rmsnorm_fwd_kernel[(n_rows,)](
                x2, d2, weight, xo, y, rstd, x2.stride(0), d2.stride(0), xo.stride(0), y.stride(0), n_cols, eps,
                BLOCK=block, num_warps=_num_warps(block),
            )  # fmt: skip
        ctx.save_for_backward(xo, weight, rstd)
        ctx.shape, ctx.delta_dtype = shape, delta.dtype
        return xo.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx, dxo: torch.Tensor, dy: torch.Tensor):  # type: ignore[override]
        xo, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = xo.shape
        dy2, dxo2 = _rows(dy, n_cols), _rows(dxo, n_cols)
        dx = torch.empty_like(xo)
        write_dd = ctx.delta_dtype != xo.dtype
        dd = torch.empty((n_rows, n_cols), dtype=ctx.delta_dtype, device=xo.device) if write_dd else dx
        programs = _num_programs(n_rows, xo.device)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=xo.device)
        block = _block_size(n_cols)
        if n_rows == 0:
            return dx.view(ctx.shape), dd.view(ctx.shape), torch.zeros_like(weight), None, None
        _add_rmsnorm_bwd_kernel[(programs,)](
            dy2, dxo2, xo, weight, rstd, dx, dd, dw_partial,
            dy2.stride(0), dxo2.stride(0), xo.stride(0), dx.stride(0), dd.stride(0),
            n_rows, n_cols, triton.cdiv(n_rows, programs), WRITE_DD=write_dd, BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
        # same dtype: the one gradient of the sum serves both summands (as autograd's add does)
        return dx.view(ctx.shape), dd.view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None, None


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next pre-norm in one kernel: ``x_new = x + delta`` in ``x.dtype`` and
    ``y = rmsnorm(x_new) * weight`` in ``out_dtype`` (default ``x.dtype``), statistics in fp32.

    Under bf16 autocast the residual stream ``x`` stays fp32 (the embedding's output dtype) while ``delta`` (a
    linear's output) and ``y`` are bf16: the stream then accumulates 2 x n_layers sublayer outputs without rounding
    each sum to bf16's 8-bit mantissa (Megatron's ``fp32_residual_connection``), at 4 instead of 2 bytes per element
    for the stream alone. Backward: the gradient of ``x_new`` from the residual path plus the norm's, in one pass.
    """
    return AddRMSNormFunction.apply(x, delta, weight, eps, out_dtype)


class FusedRMSNorm(torch.nn.Module):
    """Drop-in for ``torch.nn.RMSNorm(hidden, eps)`` with a learnable scale (same ``weight`` parameter name)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-7,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
