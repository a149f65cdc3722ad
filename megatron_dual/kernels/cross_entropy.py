"""Fused output linear + cross-entropy + z-loss, chunked over tokens, with per-token weights.

For features ``h`` (N, H), an output layer ``W`` (V, H) with bias ``b`` (V,), labels ``y`` and weights ``w``:

    logits_i = h_i W^T + b,   lse_i = logsumexp(logits_i),   nll_i = lse_i - logits_i[y_i]
    weighted = sum_i w_i * (nll_i + z * lse_i^2)

The full (N, V) logits never exist: tokens are processed ``chunk_size`` at a time; each chunk's logits are
computed, reduced by a Triton kernel to (max, sum-exp, target logit, argmax), and then overwritten *in place* by
their gradient ``w_i * (softmax_i * (1 + 2 z lse_i) - onehot(y_i))``, from which the chunk's contribution to
dh, dW and db is taken at once (the approach of Liger-Kernel's fused_linear_cross_entropy: gradients are
computed in the forward and only scaled by the incoming gradient in the backward). The gradient kernel also sums
its tiles' columns in fp32 into per-program bias-gradient partials (no separate pass over the chunk for db), and
with 16-bit operands dW is accumulated in the GEMM's fp32 output (``torch.addmm(..., out_dtype=torch.float32)``)
where this torch has it (:func:`fp32_out_addmm`). Peak extra memory is one chunk of logits plus dW/db in fp32.

Vocab-parallel variant: pass ``group`` (a tensor-parallel process group) and the local shard ``W`` (V / tp, H),
``b`` (V / tp,), shard r holding vocabulary ids ``[r * V / tp, (r + 1) * V / tp)``; per chunk the max is
all-reduced (MAX), then the rescaled sum-exp and the target logit (SUM), and the argmax (MIN over shards that hold
the global max). Every rank returns the same sums; dW and db are local shards; dh is the sum over shards
(all-reduced here when ``reduce_input_grad``; pass False when the caller's own TP mapping reduces it). ``h``,
labels and weights must be the same on every rank of the group (tokens are not sharded: gather a sequence-parallel
input first).

Labels equal to ``ignore_index`` contribute nothing. Under autocast the matmuls run in the autocast dtype (as the
unfused ``nn.Linear`` would) and the statistics in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from . import gpu
from .matmul import addmm_fp32_, fp32_out_addmm

__all__ = [
    "FusedLinearCrossEntropy",
    "FusedCESums",
    "fused_linear_cross_entropy",
    "default_chunk_size",
    "fp32_out_addmm",
    "previous_grad_path",
]

IGNORE_INDEX = -100


@triton.jit
def _ce_stats_kernel(
    logits_ptr,
    labels_ptr,
    max_ptr,
    sumexp_ptr,
    target_ptr,
    argmax_ptr,
    stride_l,
    n_vocab,
    vocab_start,
    BLOCK_V: tl.constexpr,
):
    """Per row: max, sum(exp(x - max)), the target logit (0 when the label is not in this shard), first argmax."""
    row = tl.program_id(0).to(tl.int64)
    local_label = tl.load(labels_ptr + row) - vocab_start
    base = logits_ptr + row * stride_l
    m = float("-inf")
    s = 0.0
    target = 0.0
    arg = 0
    for v0 in range(0, n_vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < n_vocab
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_arg = tl.argmax(x, axis=0)
        new_m = tl.maximum(m, block_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        arg = tl.where(block_max > m, v0 + block_arg, arg)
        m = new_m
        target += tl.sum(tl.where(ok & (cols == local_label), x, 0.0), axis=0)
    tl.store(max_ptr + row, m)
    tl.store(sumexp_ptr + row, s)
    tl.store(target_ptr + row, target)
    tl.store(argmax_ptr + row, arg)


@triton.jit
def _ce_grad_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    scale_ptr,
    db_partial_ptr,
    stride_l,
    n_rows,
    n_vocab,
    vocab_start,
    rows_per_program,
    two_z,
    HAS_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite logits with d(weighted)/d(logits) = w * (softmax * (1 + 2 z lse) - onehot), tile by tile.

    Program (s, j) covers vocabulary columns block j of rows [s * rows_per_program, (s + 1) * rows_per_program).
    With HAS_DB it also sums its gradient over those rows in fp32 (before rounding to the logits' dtype) and adds
    the column sums to row s of ``db_partial`` (S, n_vocab): each program owns its slot, so the bias gradient is
    deterministic and needs no pass of its own over the chunk's gradient."""
    pid_s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < n_vocab
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    row_begin = pid_s * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    for r0 in range(row_begin, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        local_label = tl.load(labels_ptr + rows, mask=row_ok, other=0) - vocab_start
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        coef = 1.0 + two_z * lse
        ok = row_ok[:, None] & col_ok[None, :]
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        hit = cols[None, :] == local_label[:, None]
        g = scale[:, None] * (p * coef[:, None] - tl.where(hit, 1.0, 0.0))
        tl.store(ptrs, g.to(logits_ptr.dtype.element_ty), mask=ok)
        if HAS_DB:
            acc += tl.sum(tl.where(ok, g, 0.0), axis=0)
    if HAS_DB:
        slot = db_partial_ptr + pid_s.to(tl.int64) * n_vocab + cols
        tl.store(slot, tl.load(slot, mask=col_ok, other=0.0) + acc, mask=col_ok)


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: a chunk of logits about as large as 8 rows of the features per vocabulary/hidden ratio,
    rounded to a power of two in [64, 4096] (bigger chunks: better GEMMs; smaller: less memory)."""
    chunk = triton.next_power_of_2(max(1, triton.cdiv(8 * n_tokens, max(1, triton.cdiv(vocab, hidden)))))
    return max(1, min(n_tokens, max(64, min(4096, chunk))))


@dataclass
class FusedCESums:
    weighted: torch.Tensor  # sum_i w_i (nll_i + z lse_i^2), differentiable
    nll: torch.Tensor  # sum_i w_i nll_i
    z: torch.Tensor  # sum_i w_i lse_i^2
    correct: torch.Tensor  # number of rows whose argmax is the label (float)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h.dtype


def _compiled() -> bool:
    """Whether the kernels run compiled on a GPU (block sizes for it) rather than in the CPU interpreter (bigger
    blocks: fewer Python-level steps). ``kernels.aot.fused_launches`` records the GPU's choices on a CPU."""
    return torch.cuda.is_available()


def _block_v(n_vocab: int) -> int:
    return min(4096 if _compiled() else 1024, triton.next_power_of_2(max(1, n_vocab)))


def _check_shapes(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"features {tuple(h.shape)} and weight {tuple(weight.shape)} do not form (N, H) x (V, H)")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"labels of shape {tuple(labels.shape)}; expected ({h.shape[0]},)")


def _row_stats(
    logits: torch.Tensor, y: torch.Tensor, vocab_start: int, block_v: int, group: dist.ProcessGroup | None, tp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a chunk of (local) logits: (logsumexp over the whole vocabulary, the label's logit, the global
    argmax), reducing the shards' statistics over the TP ``group``."""
    rows, v_local = logits.shape[0], logits.shape[1]
    mx = torch.empty(rows, dtype=torch.float32, device=logits.device)
    se = torch.empty_like(mx)
    tgt = torch.empty_like(mx)
    arg = torch.empty(rows, dtype=torch.int32, device=logits.device)
    _ce_stats_kernel[(rows,)](logits, y, mx, se, tgt, arg, logits.stride(0), v_local, vocab_start, BLOCK_V=block_v)
    arg = arg.long() + vocab_start
    if group is not None and tp > 1:
        gmx = mx.clone()
        dist.all_reduce(gmx, op=dist.ReduceOp.MAX, group=group)
        packed = torch.stack([se * torch.exp(mx - gmx), tgt])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        se, tgt = packed[0], packed[1]
        cand = torch.where(mx == gmx, arg, torch.iinfo(torch.int64).max)
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=group)
        arg, mx = cand, gmx
    return mx + torch.log(se), tgt, arg


@dataclass
class _GradPath:
    fp32_wgrad: bool = True  # dW accumulated in the GEMM's fp32 output (where torch has addmm(out_dtype=))
    fold_db: bool = True  # db from the gradient kernel's column sums


_PATH = _GradPath()


@contextmanager
def previous_grad_path() -> Iterator[None]:
    """Within: the chunk gradients as before issue 14 (dW as a 16-bit product, upcast and added; db as a separate
    column-sum pass over the chunk's gradient), for ``benchmarks/fused_ops.py``'s old-vs-new row and the tests."""
    saved = (_PATH.fp32_wgrad, _PATH.fold_db)
    _PATH.fp32_wgrad = _PATH.fold_db = False
    try:
        yield
    finally:
        _PATH.fp32_wgrad, _PATH.fold_db = saved


def _accumulate_wgrad(dw: torch.Tensor, g: torch.Tensor, h_c: torch.Tensor) -> None:
    """``dw`` (fp32) += g^T h_c, in the GEMM's fp32 output for 16-bit operands unless :func:`previous_grad_path`
    (about 3.8 GB less traffic per dual-470m micro-batch than the 16-bit product upcast and added)."""
    addmm_fp32_(dw, g.t(), h_c, _PATH.fp32_wgrad)


# Rows x vocabulary columns of one gradient-kernel tile: 4,096 elements on a GPU; the interpreter takes bigger
# tiles (fewer Python-level steps).
_GRAD_TILE = (8, 512)
_GRAD_TILE_INTERPRETED = (16, 1024)


def _grad_tile(n_vocab: int) -> tuple[int, int]:
    rows, cols = _GRAD_TILE if _compiled() else _GRAD_TILE_INTERPRETED
    return rows, min(cols, triton.next_power_of_2(max(1, n_vocab)))


def _row_programs(rows: int, n_vocab: int, device: torch.device) -> int:
    """Programs along the rows of a chunk (S): with the column blocks, about 8 resident programs per SM, each
    streaming its share of the rows; 4 without a GPU (the interpreter runs them one by one; 4 still splits)."""
    block_r, block_v = _grad_tile(n_vocab)
    target = 8 * gpu.sm_count(device) if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(rows, block_r), triton.cdiv(target, triton.cdiv(n_vocab, block_v))))


def _chunk_grads(
    logits: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    w_c: torch.Tensor,
    h_c: torch.Tensor,
    wc: torch.Tensor,
    grads: tuple,
    dh_rows: slice,
    vocab_start: int,
    z_loss: float,
) -> None:
    """Turn the chunk's logits into d(loss)/d(logits) in place (adding their column sums to the bias gradient's
    per-program partials), then accumulate dh (rows ``dh_rows``) and dw."""
    dh, dw, db_partial = grads
    rows, n_vocab = logits.shape
    fold = db_partial is not None and _PATH.fold_db
    block_r, block_v = _grad_tile(n_vocab)
    per = triton.cdiv(triton.cdiv(rows, _row_programs(rows, n_vocab, logits.device)), block_r) * block_r
    grid = (triton.cdiv(rows, per), triton.cdiv(n_vocab, block_v))
    _ce_grad_kernel[grid](
        logits,
        y,
        lse.contiguous(),
        w_c,
        db_partial if fold else lse,  # a placeholder pointer when there is no bias gradient to fold
        logits.stride(0),
        rows,
        n_vocab,
        vocab_start,
        per,
        2.0 * z_loss,
        HAS_DB=fold,
        BLOCK_R=block_r,
        BLOCK_V=block_v,
    )
    if db_partial is not None and not fold:
        db_partial[0] += logits.sum(0, dtype=torch.float32)
    if dh is not None:
        torch.mm(logits, wc, out=dh[dh_rows])
    if dw is not None:  # fp32 accumulation over chunks
        _accumulate_wgrad(dw, logits, h_c)


def _grad_buffers(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, wants: list[bool], cdt: torch.dtype, chunk: int
) -> tuple:
    """(dh, dw, db_partial): db_partial (S, V) fp32 holds the bias gradient's per-program column sums (summed once
    after the last chunk), S = :func:`_row_programs` of a full chunk (later chunks use at most as many)."""
    n, hidden = h.shape
    v_local = weight.shape[0]
    dh = torch.empty((n, hidden), dtype=cdt, device=h.device) if wants[0] else None
    dw = torch.zeros(tuple(weight.shape), dtype=torch.float32, device=h.device) if wants[1] else None
    db = None
    if bias is not None and wants[2]:
        s = _row_programs(chunk, v_local, h.device)
        db = torch.zeros((s, v_local), dtype=torch.float32, device=h.device)
    return dh, dw, db


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        token_weights: torch.Tensor | None,
        z_loss: float,
        chunk_size: int | None,
        group: dist.ProcessGroup | None,
        ignore_index: int,
        reduce_input_grad: bool,
        grad_enabled: bool,
        vocab_start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_shapes(h, weight, labels)
        n, hidden, v_local, device = h.shape[0], h.shape[1], weight.shape[0], h.device
        tp = dist.get_world_size(group) if group is not None else 1
        if vocab_start is None:
            vocab_start = dist.get_rank(group) * v_local if group is not None else 0
        cdt = _compute_dtype(h)
        # needs_input_grad stays True under no_grad (e.g. validation): the caller's grad mode decides
        wants = [grad_enabled and bool(x) for x in ctx.needs_input_grad[:3]]
        labels = labels.contiguous()
        valid = labels != ignore_index
        scale = valid.float() if token_weights is None else torch.where(valid, token_weights.float(), 0.0)
        scale = scale.contiguous()
        hc, wc = h.to(cdt), weight.to(cdt)
        bc = bias.to(cdt) if bias is not None else None
        chunk = chunk_size or default_chunk_size(n, hidden, v_local * tp)
        grads = _grad_buffers(h, weight, bias, wants, cdt, min(chunk, n))
        nll_sum, z_sum, correct = (torch.zeros((), dtype=torch.float32, device=device) for _ in range(3))
        block_v = _block_v(v_local)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, min(n, start + chunk))
                h_c, y, w_c, ok = hc[rows], labels[rows], scale[rows], valid[rows]
                logits = torch.addmm(bc, h_c, wc.t()) if bc is not None else h_c @ wc.t()
                lse, tgt, arg = _row_stats(logits, y, vocab_start, block_v, group, tp)
                nll_sum += (w_c * torch.where(ok, lse - tgt, 0.0)).sum()
                z_sum += (w_c * torch.where(ok, lse.square(), 0.0)).sum()
                correct += (ok & (arg == y)).sum()
                if any(wants):
                    _chunk_grads(logits, y, lse, w_c, h_c, wc, grads, rows, vocab_start, z_loss)
            weighted = nll_sum + z_loss * z_sum
        if grads[2] is not None:
            grads = (grads[0], grads[1], grads[2].sum(0))
        dh = grads[0]
        if dh is not None and group is not None and tp > 1 and reduce_input_grad:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(nll_sum, z_sum, correct)
        return weighted, nll_sum, z_sum, correct

    @staticmethod
    def backward(ctx, g: torch.Tensor, *_: torch.Tensor):  # type: ignore[override]
        dh, dw, db = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        gh = (dh * g).to(h_dtype) if dh is not None else None
        gw = (dw * g).to(w_dtype) if dw is not None else None
        gb = (db * g).to(b_dtype) if db is not None and b_dtype is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduce_input_grad: bool = True,
    vocab_start: int | None = None,
) -> FusedCESums:
    """Weighted CE + z-loss sums of ``h @ weight.T + bias`` against ``labels`` without materialising the logits.

    ``h`` (N, H), ``weight`` (V, H) (the local vocabulary shard when ``group`` is given), ``bias`` (V,) or None,
    ``labels`` (N,) int64 with ``ignore_index`` for unlabelled rows, ``token_weights`` (N,) or None (all ones).
    ``vocab_start``: first vocabulary id of this rank's shard (default: group rank x shard size, equal shards).
    Only ``weighted`` carries a gradient (to ``h``, ``weight`` and ``bias``).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    weighted, nll, z, correct = FusedLinearCrossEntropy.apply(
        h,
        weight,
        bias,
        labels,
        token_weights,
        float(z_loss),
        chunk_size,
        group,
        int(ignore_index),
        bool(reduce_input_grad),
        torch.is_grad_enabled(),
        vocab_start,
    )
    return FusedCESums(weighted, nll, z, correct)
