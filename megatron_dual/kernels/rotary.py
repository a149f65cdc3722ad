"""Fused rotary position embedding, rotate-half convention (``megatron_dual.model.rope.apply_rotary``).

For each head vector ``x = [x1, x2]`` (halves of ``D``) and per-position ``cos``/``sin`` (the model passes
``cat([f, f])`` of shape (T, D) or (B, T, D); only the first half is read):
``out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]``, computed in fp32 and stored in the input dtype.
The backward is the inverse rotation (``sin -> -sin``) of the incoming gradient.

Two entry points:
- :func:`rotary_qkv_` rotates the q and k heads of a fused qkv projection of shape (B, T, H_total * D) *in place*
  (the v heads are left alone): no copies of q or k, the form the transformer uses.
- :func:`apply_rotary` is an out-of-place drop-in for the reference on (B, H, T, D) tensors of any strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["apply_rotary", "rotary_qkv_", "rotate_heads_", "RotaryFunction", "RotaryQKVInplace"]


@triton.jit
def _rotary_kernel(
    x_ptr,
    out_ptr,
    cos_ptr,
    sin_ptr,
    seq_len,
    n_heads,
    sx_b,
    sx_t,
    sx_h,
    sx_d,
    so_b,
    so_t,
    so_h,
    so_d,
    sc_b,
    sc_t,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HALF
    cos = tl.load(cos_ptr + b * sc_b + t * sc_t + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * sc_b + t * sc_t + d, mask=d_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        sin = -sin
    x_base = x_ptr + b * sx_b + t * sx_t
    o_base = out_ptr + b * so_b + t * so_t
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < n_heads)[:, None] & d_ok[None, :]
        x1_off = h[:, None] * sx_h + d[None, :] * sx_d
        x2_off = x1_off + HALF * sx_d
        x1 = tl.load(x_base + x1_off, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_base + x2_off, mask=ok, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        o1_off = h[:, None] * so_h + d[None, :] * so_d
        o2_off = o1_off + HALF * so_d
        tl.store(o_base + o1_off, o1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(o_base + o2_off, o2.to(out_ptr.dtype.element_ty), mask=ok)


def _cos_sin_strides(
    cos: torch.Tensor, sin: torch.Tensor, batch: int, seq_len: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    if cos.dim() != 3 or cos.shape[-2:] != (seq_len, head_dim) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not match (T, D) or (B, T, D) = ({batch}, {seq_len}, {head_dim})"
        )
    cos = cos.float().contiguous()
    sin = sin.float().contiguous()
    stride_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    return cos, sin, stride_b, cos.stride(1)


def _launch(x_bthd: torch.Tensor, out_bthd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Rotate x viewed as (B, T, H, D) (any strides) into out (same shape, may alias x)."""
    batch, seq_len, n_heads, head_dim = x_bthd.shape
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {head_dim}")
    cos, sin, sc_b, sc_t = _cos_sin_strides(cos, sin, batch, seq_len, head_dim)
    half = head_dim // 2
    if batch * seq_len * n_heads == 0:
        return
    for t in (x_bthd, out_bthd):  # the kernel's per-token offsets over (H, D) are int32 (its b, t offsets int64)
        span = (n_heads - 1) * t.stride(2) + (head_dim - 1) * t.stride(3)
        if max(t.stride(2), t.stride(3)) <= 2**31 - 1 < span:
            raise ValueError(f"rotary: one token's heads span {span} elements (strides {t.stride()}), over 2^31")
    block_d = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(n_heads), 4096 // block_d))
    _rotary_kernel[(batch * seq_len,)](
        x_bthd,
        out_bthd,
        cos,
        sin,
        seq_len,
        n_heads,
        *x_bthd.stride(),
        *out_bthd.stride(),
        sc_b,
        sc_t,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        BACKWARD=backward,
    )


def rotate_heads_(x_bthd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> None:
    """Rotate ``x_bthd`` (B, T, H, D), any strides, in place; ``inverse`` applies the backward (sin -> -sin).

    No autograd: for callers that own their backward, e.g. the packed qkv attention, which rotates the q and k
    heads of the projection's output and, in its backward, the dq and dk heads of the packed gradient.
    """
    _launch(x_bthd, x_bthd, cos, sin, backward=inverse)


class RotaryFunction(torch.autograd.Function):
    """Out-of-place rotary on (B, H, T, D)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = torch.empty_like(x)
        _launch(x.transpose(1, 2), out.transpose(1, 2), cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        dx = torch.empty_like(grad)
        _launch(grad.transpose(1, 2), dx.transpose(1, 2), cos, sin, backward=True)
        return dx, None, None


class RotaryQKVInplace(torch.autograd.Function):
    """In-place rotary on the first ``n_rotated`` heads of a fused qkv tensor (B, T, H_total * D)."""

    @staticmethod
    def forward(
        ctx,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,  # type: ignore[override]
        n_rotated: int,
        head_dim: int,
    ) -> torch.Tensor:
        heads = qkv.view(qkv.shape[0], qkv.shape[1], -1, head_dim)[:, :, :n_rotated]
        _launch(heads, heads, cos, sin, backward=False)
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.n_rotated, ctx.head_dim = n_rotated, head_dim
        return qkv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        n, d = ctx.n_rotated, ctx.head_dim
        dqkv = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        g4 = (
            grad.view(grad.shape[0], grad.shape[1], -1, d)
            if grad.stride(-1) == 1
            else grad.reshape(grad.shape[0], grad.shape[1], -1, d)
        )
        d4 = dqkv.view(g4.shape)
        d4[:, :, n:] = g4[:, :, n:]
        _launch(g4[:, :, :n], d4[:, :, :n], cos, sin, backward=True)
        return dqkv, None, None, None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Fused drop-in for ``megatron_dual.model.rope.apply_rotary``: x (B, H, T, D), cos/sin (T, D) or (B, T, D)."""
    return RotaryFunction.apply(x, cos, sin)


def rotary_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rotated: int, head_dim: int) -> torch.Tensor:
    """Rotate heads ``[0, n_rotated)`` (q then k heads) of ``qkv`` (B, T, H_total * D) in place; returns ``qkv``.

    The intended input is the qkv projection's output itself (not a leaf that requires grad): rotating it rather
    than a view of it keeps autograd from wrapping the op in a view-replay (CopySlices) node.
    """
    if qkv.dim() != 3 or qkv.shape[-1] % head_dim or qkv.stride(-1) != 1:
        raise ValueError(
            f"rotary_qkv_ expects (B, T, H_total * {head_dim}) with unit last stride, got shape {tuple(qkv.shape)}"
        )
    if not 0 <= n_rotated <= qkv.shape[-1] // head_dim:
        raise ValueError(f"n_rotated = {n_rotated} is outside [0, {qkv.shape[-1] // head_dim}] heads")
    return RotaryQKVInplace.apply(qkv, cos, sin, n_rotated, head_dim)
