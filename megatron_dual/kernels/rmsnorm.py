"""Fused RMSNorm with a learnable scale: ``y = x * rsqrt(mean(x^2) + eps) * weight``, statistics in fp32.

Forward stores the per-row reciprocal RMS; backward recomputes ``x_hat`` from it and writes ``dx`` directly, while
``dweight`` is accumulated in fp32 by a fixed number of programs (each owns a contiguous block of rows) and the
per-program partial sums are reduced in torch. Any hidden size works (the row is padded to a power of two and
masked), e.g. 100, 1024 or 3554. The output may be written in another dtype than the input (the autocast dtype).

:func:`add_rms_norm` fuses the residual add in front of the norm (``x + delta``, then the norm of the sum) and, in
backward, the residual gradient behind it: one read of each operand per pass instead of an add, a norm and a cast.
One forward and one backward kernel serve both, the add switched on by a constexpr (``HAS_DELTA`` / ``HAS_DXO``):
the plain norm compiles to the instructions it had as a kernel of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import gpu

__all__ = ["AddRMSNormFunction", "FusedRMSNorm", "RMSNormFunction", "add_rms_norm", "rms_norm"]

_MAX_FUSED_SIZE = 65536


@triton.jit
def _rmsnorm_fwd_kernel(
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
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``y = rmsnorm(x) * w`` in ``y``'s dtype; with ``HAS_DELTA``, the norm of ``xo = x + d`` instead, the sum
    stored in ``xo``'s dtype (the residual stream's). ``d_ptr`` and ``xo_ptr`` are not read without it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    valid = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * stride_d + cols, mask=valid, other=0.0).to(tl.float32)
        # the statistics see the stored residual (rounded to its dtype), as the backward that reloads it does
        xo = (x + d).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + row * stride_xo + cols, xo, mask=valid)
        x = xo.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * stride_y + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=valid)


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
    dxo_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dd_ptr,
    dw_partial_ptr,
    stride_dy,
    stride_dxo,
    stride_x,
    stride_dx,
    stride_dd,
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DXO: tl.constexpr,
    WRITE_DD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``dx = d rmsnorm/d x (dy)``, plus the residual path's ``dxo`` with ``HAS_DXO`` (the add-norm's backward: the
    gradient of both summands, also written to ``dd`` when its dtype differs, ``WRITE_DD``). ``dweight`` is
    accumulated in fp32 per program over a contiguous block of rows; the partial sums are reduced in torch."""
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
            if HAS_DXO:
                g = tl.load(dxo_ptr + row * stride_dxo + cols, mask=valid, other=0.0).to(tl.float32)
            dx, dw_row = _norm_grads(x, dy, w, tl.load(rstd_ptr + row), n_cols)
            if HAS_DXO:
                dx += g
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=valid)
            if WRITE_DD:
                tl.store(dd_ptr + row * stride_dd + cols, dx.to(dd_ptr.dtype.element_ty), mask=valid)
            dw_acc += dw_row
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=valid)


def _block_size(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > _MAX_FUSED_SIZE:
        raise ValueError(f"fused RMSNorm supports hidden sizes up to {_MAX_FUSED_SIZE}, got {n_cols}")
    return block


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _num_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * gpu.sm_count(device)))
    return max(1, min(n_rows, 4))  # the interpreter: few programs, rows looped inside each


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_weight(weight: torch.Tensor, n_cols: int) -> None:
    if weight.shape != (n_cols,):
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)}; expected ({n_cols},)")


def _norm_forward(
    x2: torch.Tensor, d2: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xo, y, rstd)`` for rows ``x2`` (plus ``d2`` when given; else ``xo`` is ``x2`` itself)."""
    n_rows, n_cols = x2.shape
    has_delta = d2 is not None
    xo = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device) if has_delta else x2
    y = torch.empty((n_rows, n_cols), dtype=out_dtype or x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    block = _block_size(n_cols)
    d2 = d2 if has_delta else x2  # not read without HAS_DELTA
    if n_rows > 0:
        _rmsnorm_fwd_kernel[(n_rows,)](
            x2, d2, weight, xo, y, rstd, x2.stride(0), d2.stride(0), xo.stride(0), y.stride(0), n_cols, eps,
            HAS_DELTA=has_delta, BLOCK=block, num_warps=_num_warps(block),
        )  # fmt: skip
    return xo, y, rstd


def _norm_backward(
    dy2: torch.Tensor,
    dxo2: torch.Tensor | None,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dd_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dd, dweight)``: ``dx`` in ``x2``'s dtype, plus ``dxo2`` when given; ``dd`` is ``dx`` itself unless
    ``dd_dtype`` differs from it (the add-norm's second summand)."""
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    write_dd = dd_dtype != x2.dtype
    dd = torch.empty((n_rows, n_cols), dtype=dd_dtype, device=x2.device) if write_dd else dx
    if n_rows == 0:
        return dx, dd, torch.zeros_like(weight)
    programs = _num_programs(n_rows, x2.device)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    block = _block_size(n_cols)
    has_dxo, dxo2 = dxo2 is not None, dy2 if dxo2 is None else dxo2  # not read without HAS_DXO
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, dxo2, x2, weight, rstd, dx, dd, dw_partial,
        dy2.stride(0), dxo2.stride(0), x2.stride(0), dx.stride(0), dd.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, programs),
        HAS_DXO=has_dxo, WRITE_DD=write_dd, BLOCK=block, num_warps=_num_warps(block),
    )  # fmt: skip
    return dx, dd, dw_partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        _check_weight(weight, x.shape[-1])
        x2 = _rows(x, x.shape[-1])
        _, y, rstd = _norm_forward(x2, None, weight, eps, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = _norm_backward(_rows(dy, x2.shape[1]), None, x2, weight, rstd, x2.dtype)
        return dx.view(ctx.shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused RMSNorm over the last dimension; statistics in fp32, output in ``out_dtype`` (default ``x.dtype``).

    Under autocast the caller passes the autocast dtype: the next linear then reads the output as it is instead of
    casting an fp32 copy (and its backward returns ``dy`` in that dtype, which the kernel reads as it is too);
    ``dx`` always has ``x``'s dtype.
    """
    return RMSNormFunction.apply(x, weight, eps, out_dtype)


class AddRMSNormFunction(torch.autograd.Function):
    """``(x + delta, rmsnorm(x + delta) * weight)`` in one pass over the rows; see :func:`add_rms_norm`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shape, n_cols = x.shape, x.shape[-1]
        if delta.shape != shape:
            raise ValueError(f"add_rms_norm: delta has shape {tuple(delta.shape)}; expected {tuple(shape)}")
        _check_weight(weight, n_cols)
        xo, y, rstd = _norm_forward(_rows(x, n_cols), _rows(delta, n_cols), weight, eps, out_dtype)
        ctx.save_for_backward(xo, weight, rstd)
        ctx.shape, ctx.delta_dtype = shape, delta.dtype
        return xo.view(shape), y.view(shape)

    @staticmethod
    def backward(ctx, dxo: torch.Tensor, dy: torch.Tensor):  # type: ignore[override]
        xo, weight, rstd = ctx.saved_tensors
        n_cols = xo.shape[1]
        dx, dd, dw = _norm_backward(_rows(dy, n_cols), _rows(dxo, n_cols), xo, weight, rstd, ctx.delta_dtype)
        # same dtype: the one gradient of the sum serves both summands (as autograd's add does)
        return dx.view(ctx.shape), dd.view(ctx.shape), dw, None, None


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
