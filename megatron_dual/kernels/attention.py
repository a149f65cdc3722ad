"""Flash attention in Triton for the dual objective's masks: causal, bidirectional, prefix-LM and documents.

Layout: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA); any strides with a unit stride
on D. The output is a (B, Hq, Tq, D) view of (B, Tq, Hq, D) memory (the output projection's layout: no transpose
copy follows). The forward pass streams key/value tiles past a resident query tile with an online softmax (running
max and running sum in fp32) and saves one log-sum-exp per query row; the backward pass recomputes the
probabilities from it: one kernel walks the key tiles for each query tile (dQ; its prologue also computes
delta = rowsum(dO * O) in fp32 and stores it) and then one walks the query tiles for each key tile (dK, dV; the GQA
group's query heads are summed in the same program, so there are no atomics).
:func:`flash_attention_qkv` takes the fused qkv projection's output instead: rotary in place, attention, and one
packed (B, T, Hq + 2 Hkv, D) gradient with the inverse rotation applied in place on it.

Masks, with query i at absolute position ``q_offset + i``:

* ``bidirectional``: everything; ``causal``: key position <= query position;
* ``prefix``: bidirectional inside the first ``prefix_len[b]`` positions, causal after them
  (key allowed iff ``key <= query or key < prefix_len[b]``);
* ``doc_ids`` (B, Tk): a query only sees keys of its own document; combinable with each of the above.

Tiles that the mask empties are never visited: the key range of a query tile is cut to the causal (or prefix)
bound and to the span of the documents in the tile (``document_spans``: per position, the first and one past the
last position of its document; correct for any layout of ids, tight when documents are contiguous runs). Only the
tiles that straddle the diagonal, the prefix end or the sequence end evaluate the positional mask element-wise, and
only the tiles that straddle a document boundary compare document ids: a pair of tiles lies inside one document
when the run (``run_bounds``: the stretch of equal ids) around the first position of one side covers the other.

Block sizes are autotuned from a list per architecture (``ARCH_SHAPES``: sm80, sm90, gfx90a, chosen from the device
when a kernel is first tuned), keyed on head dim, mask, a power-of-two length bucket and the device model; where
``triton.autotune`` takes ``cache_results`` the results are cached on disk; under ``TRITON_INTERPRET=1`` one small
config.
This module must be imported after ``TRITON_INTERPRET`` is set (triton reads it when a kernel is decorated).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import zlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

MASK_CODES = {"bidirectional": 0, "causal": 1, "prefix": 2}
_LOG2E = 1.4426950408889634
INTERPRET = bool(triton.knobs.runtime.interpret)
IS_HIP = torch.version.hip is not None


# Candidate (BLOCK_M, BLOCK_N, warps, stages) per architecture and kernel; BLOCK_M tiles queries and BLOCK_N keys
# in every kernel. The first entry of each list is what autotune mode "one" runs. The small backward tiles get more
# pipeline stages (their loads are short, so more of them can be in flight); sm90 has 228 KB of shared memory per
# SM against sm80's 164 KB, hence deeper pipelines there; gfx90a (MI250X, 64-wide wavefronts): the stream pipeliner
# wants num_stages 1 or 2.
ARCH_SHAPES: dict[str, dict[str, list[tuple[int, int, int, int]]]] = {
    "sm80": {
        "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 3)],
        "bwd_kv": [(32, 128, 4, 3), (64, 128, 8, 2), (32, 64, 4, 4), (64, 64, 4, 3), (16, 128, 4, 4), (16, 64, 4, 5)],
        "bwd_q": [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 4)],
    },
    "sm90": {
        "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 32, 4, 5), (64, 128, 4, 3)],
        "bwd_kv": [(32, 128, 4, 4), (64, 128, 8, 3), (64, 64, 4, 4), (32, 64, 4, 5), (16, 128, 4, 5)],
        "bwd_q": [(128, 32, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 5), (32, 64, 4, 5)],
    },
    "gfx90a": {
        "fwd": [(128, 64, 4, 1), (64, 64, 4, 1), (128, 32, 4, 1), (64, 64, 4, 2)],
        "bwd_kv": [(32, 64, 4, 1), (64, 64, 4, 1), (16, 128, 4, 1), (32, 64, 4, 2)],
        "bwd_q": [(64, 32, 4, 1), (64, 64, 4, 1), (128, 32, 4, 1), (64, 32, 4, 2)],
    },
}
_INTERPRET_SHAPES = {"fwd": (32, 16), "bwd_q": (32, 16), "bwd_kv": (16, 32)}  # BLOCK_M != BLOCK_N: tests see
# tile-alignment bugs


def _config(shape: tuple[int, int, int, int]) -> triton.Config:
    m, n, w, s = shape
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _shape(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _configs(kind: str) -> list[triton.Config]:
    """Every candidate this build may use (ROCm: gfx90a's; CUDA: sm80's and sm90's); :func:`_prune` keeps the
    current device's list when a kernel is first tuned (the arch is not known at import without touching CUDA)."""
    if INTERPRET:
        m, n = _INTERPRET_SHAPES[kind]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=1, num_stages=1)]
    archs = ["gfx90a"] if IS_HIP else ["sm80", "sm90"]
    shapes = list(dict.fromkeys(x for arch in archs for x in ARCH_SHAPES[arch][kind]))
    return [_config(x) for x in shapes]


@functools.cache
def _device_arch(index: int) -> str:
    if IS_HIP:
        return "gfx90a"
    major, _ = torch.cuda.get_device_capability(index)
    return "sm90" if major >= 9 else "sm80"


def device_arch(device: torch.device) -> str:
    """Which :data:`ARCH_SHAPES` list a device tunes from: ``gfx90a`` on ROCm, ``sm90`` for compute capability 9
    and up, ``sm80`` below; ``interpret`` on CPU."""
    if device.type != "cuda":
        return "interpret"
    return _device_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_key_of(index: int) -> int:
    return zlib.crc32(torch.cuda.get_device_name(index).encode()) & 0x7FFFFFFF


def _device_key(device: torch.device) -> int:
    """A tuning-key number per device model (an H100 and an H200 are both sm90 but tune apart, and Triton's
    on-disk autotuning cache keeps them apart too)."""
    if device.type != "cuda":
        return 0
    return _device_key_of(device.index if device.index is not None else torch.cuda.current_device())


AUTOTUNE_MODES = ("full", "one")
# "full": benchmark every candidate the first time a tuning key is seen; "one": take the first candidate that fits
# without benchmarking (a fresh GPU's validation run: compile one config per kernel, not all). Read at each new
# tuning key, so set_autotune() switches it at run time; MEGATRON_DUAL_AUTOTUNE sets the default.
AUTOTUNE = os.environ.get("MEGATRON_DUAL_AUTOTUNE", "full")
if AUTOTUNE not in AUTOTUNE_MODES:
    raise ValueError(f"MEGATRON_DUAL_AUTOTUNE = {AUTOTUNE!r}; allowed: {', '.join(AUTOTUNE_MODES)}")


def set_autotune(mode: str) -> str:
    """Set the autotuning mode for tuning keys not seen yet (see :data:`AUTOTUNE`); returns the previous one."""
    global AUTOTUNE
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"autotune mode {mode!r}; allowed: {', '.join(AUTOTUNE_MODES)}")
    previous, AUTOTUNE = AUTOTUNE, mode
    return previous


def _for_arch(configs: list[triton.Config], kind: str, arch: str) -> list[triton.Config]:
    """The candidates of ``arch``'s list for ``kind``, in that list's order (all of them where the arch has none)."""
    if arch not in ARCH_SHAPES:
        return configs
    by_shape = {_shape(c): c for c in configs}
    return [by_shape[x] for x in ARCH_SHAPES[arch][kind] if x in by_shape] or configs


def _prune(
    configs: list[triton.Config], named_args: dict, kind: str | None = None, **kwargs: object
) -> list[triton.Config]:
    """Keep the current device's candidates for kernel ``kind`` (see :data:`ARCH_SHAPES`); drop tiles that overflow
    shared memory for large head dims (D=256 wants 64-wide tiles); under autotune mode ``one`` keep only the first
    remaining candidate (Triton then runs it without benchmarking)."""
    q = named_args.get("Q")
    if kind is not None and isinstance(q, torch.Tensor):
        configs = _for_arch(configs, kind, device_arch(q.device))
    d = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs.get("HEAD_DIM", 64)
    keep = [c for c in configs if d < 256 or (c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64)]
    keep = keep or configs[-1:]
    return keep[:1] if AUTOTUNE == "one" else keep


_TUNE_KEY = ["HEAD_DIM", "MASK_KIND", "HAS_DOCS", "SEQ_BUCKET", "GROUP_KEY", "DEVICE_KEY"]
# Tritons whose autotune takes cache_results keep the tuning results on disk (next to the compiled kernels): a new
# process skips the benchmark; MEGATRON_DUAL_AUTOTUNE_CACHE=0 turns that off
_CACHE_RESULTS = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters
    and os.environ.get("MEGATRON_DUAL_AUTOTUNE_CACHE", "1") != "0"
    else {}
)


def _autotune(kind: str, extra_key: tuple[str, ...] = ()) -> Callable:
    return triton.autotune(
        configs=_configs(kind),
        key=_TUNE_KEY + list(extra_key),
        prune_configs_by={"early_config_prune": functools.partial(_prune, kind=kind)},
        **_CACHE_RESULTS,
    )


@triton.jit
def _pos_mask(q_pos, k_pos, plen, MASK_KIND: tl.constexpr):
    """(BLOCK_M, BLOCK_N) boolean: may query q_pos[i] see key k_pos[j] (positions only, documents apart)."""
    if MASK_KIND == 1:
        ok = k_pos[None, :] <= q_pos[:, None]
    elif MASK_KIND == 2:
        ok = (k_pos[None, :] <= q_pos[:, None]) | (k_pos[None, :] < plen)
    else:
        ok = (k_pos[None, :] >= 0) & (q_pos[:, None] >= 0)
    return ok


@triton.jit
def _pos_mask_t(k_pos, q_pos, plen, MASK_KIND: tl.constexpr):
    """The transpose of :func:`_pos_mask`, (BLOCK_N, BLOCK_M), built directly in the key-major layout."""
    if MASK_KIND == 1:
        ok = k_pos[:, None] <= q_pos[None, :]
    elif MASK_KIND == 2:
        ok = (k_pos[:, None] <= q_pos[None, :]) | (k_pos[:, None] < plen)
    else:
        ok = (k_pos[:, None] >= 0) & (q_pos[None, :] >= 0)
    return ok


@triton.jit
def _query_tile_key_range(
    start_m,
    b,
    T_Q,
    T_K,
    Q_OFFSET,
    plen,
    q_pos,
    m_valid,
    DOC_LO,
    DOC_HI,
    sdoc,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Keys [lo, hi) that some query of the tile may see, and mid: tiles below mid need no positional mask."""
    first_q = start_m + Q_OFFSET
    last_q = tl.minimum(start_m + BLOCK_M, T_Q) - 1 + Q_OFFSET
    lo = first_q * 0
    hi = first_q * 0 + T_K
    # keys below mid are visible to every query of the tile (as far as positions go)
    mid = first_q * 0 + T_K
    if MASK_KIND == 1:
        hi = tl.minimum(hi, last_q + 1)
        mid = first_q + 1
    if MASK_KIND == 2:
        hi = tl.minimum(hi, tl.maximum(last_q + 1, plen))
        mid = tl.maximum(first_q + 1, plen)
    if HAS_DOCS:
        d_lo = tl.load(DOC_LO + b * sdoc + q_pos, mask=m_valid, other=T_K)
        d_hi = tl.load(DOC_HI + b * sdoc + q_pos, mask=m_valid, other=0)
        lo = tl.maximum(lo, tl.min(d_lo, 0))
        hi = tl.minimum(hi, tl.max(d_hi, 0))
    lo = (lo // BLOCK_N) * BLOCK_N
    mid = tl.minimum(mid, T_K)  # the ragged last key tile needs its bound mask
    mid = (mid // BLOCK_N) * BLOCK_N
    mid = tl.maximum(lo, tl.minimum(mid, hi))
    return lo, mid, hi


@triton.jit
def _full_range(RUN_LO, RUN_HI, row, first, last, shift, limit, BLOCK: tl.constexpr):
    """Indices [f_lo, f_hi) of the other side whose BLOCK-aligned tiles lie wholly inside the run (the contiguous
    stretch of one document id) holding positions first..last of this side; f_lo = f_hi = limit when first..last
    straddle a run boundary. Positions minus ``shift`` are indices; a tile reaching past ``limit`` (the index count)
    counts as inside: its rows beyond the end are masked by bounds anyway."""
    r_lo = tl.load(RUN_LO + (row + first))  # row is int64 (a batch offset): one 64-bit scalar offset
    r_hi = tl.load(RUN_HI + (row + first))
    inside = r_hi > last
    i_lo = tl.maximum(r_lo - shift, 0)
    i_hi = tl.maximum(r_hi - shift, 0)
    f_lo = tl.cdiv(i_lo, BLOCK) * BLOCK
    f_hi = tl.where(i_hi >= limit, limit, (i_hi // BLOCK) * BLOCK)
    return tl.where(inside, f_lo, limit), tl.where(inside, f_hi, limit)


@triton.jit
def _query_tile(H, GROUP, T_Q, Q_OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's query tile: (pid_bh, b, h, hk, start_m, offs_m, offs_n0, offs_d, m_valid, q_pos). The heaviest
    tiles (the last, under a causal mask) go first. Batch and head offsets are int64 from here: b * stride reaches
    past 2^31 on large batches (the packed qkv's batch stride is T (Hq + 2 Hkv) D); in-tile offsets (< T * stride_t,
    checked on the host) stay int32."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    return pid_bh, b, h, hk, start_m, offs_m, offs_n0, offs_d, offs_m < T_Q, offs_m + Q_OFFSET


@triton.jit
def _key_plan(
    docs,
    kv,
    b,
    hk,
    start_m,
    q_pos,
    m_valid,
    sizes,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """What a query tile needs to walk the key tiles, in the forward and in dQ alike: (plen, q_doc, k_base, v_base,
    lo, mid, hi, a1, a2, f_lo, f_hi). ``docs`` = (DOCS, DOC_LO, DOC_HI, RUN_LO, RUN_HI, PREFIX, sdoc), ``kv`` =
    (K, V and their batch, head and row strides), ``sizes`` = (T_Q, T_K, Q_OFFSET). Keys [lo, hi) may be seen;
    tiles from mid on need the positional mask; [a1, a2) of [lo, mid), and every tile in [f_lo, f_hi), lie inside
    the query tile's document run (no document compare); without documents [a1, a2) = [lo, mid). k_base and v_base
    are tensor descriptors under USE_TMA (sm90, MEGATRON_DUAL_ATTN_TMA=1: one 2-D descriptor per (batch, kv head)
    over (T_K, D))."""
    DOCS, DOC_LO, DOC_HI, RUN_LO, RUN_HI, PREFIX, sdoc = docs
    K, V, skb, skh, skt, svb, svh, svt = kv
    T_Q, T_K, Q_OFFSET = sizes
    plen = 0
    if MASK_KIND == 2:
        plen = tl.load(PREFIX + b)
    q_doc = q_pos
    if HAS_DOCS:
        q_doc = tl.load(DOCS + b * sdoc + q_pos, mask=m_valid, other=-2)
    lo, mid, hi = _query_tile_key_range(
        start_m, b, T_Q, T_K, Q_OFFSET, plen, q_pos, m_valid, DOC_LO, DOC_HI, sdoc, MASK_KIND, HAS_DOCS, BLOCK_M,
        BLOCK_N,
    )  # fmt: skip
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if USE_TMA:
        k_base = tl.make_tensor_descriptor(k_base, [T_K, HEAD_DIM], [skt, 1], [BLOCK_N, HEAD_DIM])
        v_base = tl.make_tensor_descriptor(v_base, [T_K, HEAD_DIM], [svt, 1], [BLOCK_N, HEAD_DIM])
    if HAS_DOCS:
        last_q = tl.minimum(start_m + BLOCK_M, T_Q) - 1 + Q_OFFSET
        f_lo, f_hi = _full_range(RUN_LO, RUN_HI, b * sdoc, start_m + Q_OFFSET, last_q, 0, T_K, BLOCK_N)
        a1 = tl.minimum(tl.maximum(f_lo, lo), mid)
        a2 = tl.minimum(tl.maximum(f_hi, a1), mid)
    else:
        a1, a2, f_lo, f_hi = lo, mid, lo, lo
    return plen, q_doc, k_base, v_base, lo, mid, hi, a1, a2, f_lo, f_hi


@triton.jit
def _fwd_tiles(
    state,
    query,
    keys,
    tiles,
    scale_log2,
    MASK_KIND: tl.constexpr,
    DOC_MASK: tl.constexpr,
    POS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Key tiles [lo, hi) but [skip_at, skip_at + skip_len) into the online softmax ``state`` = (acc, m_i, l_i)
    of the query tile ``query`` = (q, q_pos, q_doc, plen); ``keys`` = (k, v: pointers or TMA descriptors, their
    row strides, DOCS, b, sdoc, T_K, offs_n0, offs_d); key tiles in [in_lo, in_hi) lie inside the query tile's run."""
    acc, m_i, l_i = state
    q, q_pos, q_doc, plen = query
    k_base, v_base, skt, svt, DOCS, b, sdoc, T_K, offs_n0, offs_d = keys
    lo, hi, skip_at, skip_len, in_lo, in_hi = tiles
    for it in range(lo, hi, BLOCK_N):
        start_n = it + (it >= skip_at) * skip_len  # [skip_at, skip_at + skip_len) is left out
        offs_n = start_n + offs_n0
        n_valid = offs_n < T_K
        if USE_TMA:  # k_base and v_base are tensor descriptors: bulk copies, rows past T_K come back as zeros
            k = k_base.load([start_n, 0])
        elif POS_MASK:
            k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # unscaled: the scale joins the fma below
        if POS_MASK:
            ok = _pos_mask(q_pos, offs_n, plen, MASK_KIND) & n_valid[None, :]
            if DOC_MASK:
                if (start_n < in_lo) | (start_n >= in_hi):  # else the key tile lies inside the query tile's run
                    k_doc = tl.load(DOCS + b * sdoc + offs_n, mask=n_valid, other=-1)
                    ok = ok & (q_doc[:, None] == k_doc[None, :])
            qk = tl.where(ok, qk, float("-inf"))
        elif DOC_MASK:
            k_doc = tl.load(DOCS + b * sdoc + offs_n)
            qk = tl.where(q_doc[:, None] == k_doc[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)  # scale_log2 > 0: the max commutes with it
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(tl.fma(qk, scale_log2, -m_safe[:, None]))
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_base.load([start_n, 0])
        elif POS_MASK:
            v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :])
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@_autotune("fwd", ("USE_TMA",))
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    DOCS,
    DOC_LO,
    DOC_HI,
    RUN_LO,
    RUN_HI,
    PREFIX,
    scale_log2,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    sdoc,
    H,
    GROUP,
    T_Q,
    T_K,
    Q_OFFSET,
    SEQ_BUCKET,
    GROUP_KEY,
    DEVICE_KEY,
    HEAD_DIM: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, offs_n0, offs_d, m_valid, q_pos = _query_tile(
        H, GROUP, T_Q, Q_OFFSET, BLOCK_M, BLOCK_N, HEAD_DIM
    )
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    plen, q_doc, k_base, v_base, lo, mid, hi, a1, a2, f_lo, f_hi = _key_plan(
        (DOCS, DOC_LO, DOC_HI, RUN_LO, RUN_HI, PREFIX, sdoc), (K, V, skb, skh, skt, svb, svh, svt), b, hk, start_m,
        q_pos, m_valid, (T_Q, T_K, Q_OFFSET), MASK_KIND, HAS_DOCS, USE_TMA, BLOCK_M, BLOCK_N, HEAD_DIM,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    query = (q, q_pos, q_doc, plen)
    keys = (k_base, v_base, skt, svt, DOCS, b, sdoc, T_K, offs_n0, offs_d)
    # key tiles below mid need no positional mask; those in [a1, a2) lie inside the query tile's document run
    # and need no document compare either (only tiles straddling a document boundary pay for it): one loop
    # over [lo, a1) and [a2, mid) with the compare, one over [a1, a2) without, one over [mid, hi) positional
    if HAS_DOCS:
        acc, m_i, l_i = _fwd_tiles(
            (acc, m_i, l_i), query, keys, (lo, mid - (a2 - a1), a1, a2 - a1, f_lo, f_hi), scale_log2, MASK_KIND, True,
            False, BLOCK_N, DOT_PRECISION, USE_TMA,
        )  # fmt: skip
    acc, m_i, l_i = _fwd_tiles(
        (acc, m_i, l_i), query, keys, (a1, a2, a2, 0, f_lo, f_hi), scale_log2, MASK_KIND, False, False, BLOCK_N,
        DOT_PRECISION, USE_TMA,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_tiles(
        (acc, m_i, l_i), query, keys, (mid, hi, hi, 0, f_lo, f_hi), scale_log2, MASK_KIND, HAS_DOCS, True, BLOCK_N,
        DOT_PRECISION, USE_TMA,
    )  # fmt: skip
    empty = l_i == 0.0  # a query that sees no key at all: output 0, and lse = +inf makes its backward p = 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))  # log-sum-exp in base 2 of scaled scores
    tl.store(LSE + pid_bh * T_Q + offs_m, lse2, mask=m_valid)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _bwd_kv_tiles(
    state,
    key,
    queries,
    tiles,
    scale_log2,
    MASK_KIND: tl.constexpr,
    DOC_MASK: tl.constexpr,
    POS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """``state`` = (dk, dv) of the key tile ``key`` = (k, v, k_pos, k_doc, plen) over the query tiles [lo, hi) but
    [skip_at, skip_at + skip_len) of one query head; ``queries`` = (q, do, lse and delta pointers, q and do row
    strides, T_Q, Q_OFFSET, DOCS, b, sdoc, offs_m0, offs_d); query tiles in [in_lo, in_hi) lie inside the key
    tile's run."""
    dk, dv = state
    k, v, k_pos, k_doc, plen = key
    q_base, do_base, lse_base, delta_base, sqt, sdot, T_Q, Q_OFFSET, DOCS, b, sdoc, offs_m0, offs_d = queries
    lo, hi, skip_at, skip_len, in_lo, in_hi = tiles
    for it in range(lo, hi, BLOCK_M):
        start_m = it + (it >= skip_at) * skip_len  # [skip_at, skip_at + skip_len) is left out
        offs_m = start_m + offs_m0
        m_valid = offs_m < T_Q
        if USE_TMA:  # q_base and do_base are tensor descriptors: rows past T_Q come back as zeros
            q = q_base.load([start_m, 0])
            do = do_base.load([start_m, 0])
        else:
            q = tl.load(q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=m_valid[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf"))  # rows past T_Q get p = 0
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(tl.fma(qk_t, scale_log2, -lse2[None, :]))
        q_pos = offs_m + Q_OFFSET
        if POS_MASK:
            # (rows of a ragged key tile past T_K may get inf here: each row's dk / dv is its own and never stored)
            ok = _pos_mask_t(k_pos, q_pos, plen, MASK_KIND)
            if DOC_MASK:
                if (start_m < in_lo) | (start_m >= in_hi):  # else the query tile lies inside the key tile's run
                    q_doc = tl.load(DOCS + b * sdoc + q_pos, mask=m_valid, other=-2)
                    ok = ok & (k_doc[:, None] == q_doc[None, :])
            p_t = tl.where(ok, p_t, 0.0)
        elif DOC_MASK:
            q_doc = tl.load(DOCS + b * sdoc + q_pos, mask=m_valid, other=-2)
            p_t = tl.where(k_doc[:, None] == q_doc[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _key_tile_query_range(
    start_n,
    b,
    T_Q,
    T_K,
    Q_OFFSET,
    plen,
    offs_n,
    n_valid,
    DOCS,
    DOC_LO,
    DOC_HI,
    RUN_LO,
    RUN_HI,
    sdoc,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Queries [lo, hi) that may see some key of the tile (starting at ``start_n``), split at mid, b1 and b2:
    [lo, mid) needs the positional mask, [b1, b2) lies inside the key tile's document run (no document compare);
    [in_lo, in_hi): the query tiles inside that run wherever they lie (the positional tiles among them skip the
    document compare too); and the keys' document ids."""
    # queries [lo, hi) that may see some key of the tile; queries from mid on see all of them (positionally)
    lo = start_n * 0
    hi = start_n * 0 + T_Q
    mid = lo
    if MASK_KIND == 1:
        lo = tl.maximum(lo, start_n - Q_OFFSET)
        mid = tl.maximum(lo, start_n + BLOCK_N - 1 - Q_OFFSET)
    if MASK_KIND == 2:
        if start_n + BLOCK_N > plen:  # not entirely inside the prefix
            if start_n >= plen:
                lo = tl.maximum(lo, start_n - Q_OFFSET)
            mid = tl.maximum(lo, start_n + BLOCK_N - 1 - Q_OFFSET)
    k_doc = offs_n
    if HAS_DOCS:
        k_doc = tl.load(DOCS + b * sdoc + offs_n, mask=n_valid, other=-1)
        d_lo = tl.load(DOC_LO + b * sdoc + offs_n, mask=n_valid, other=T_K)
        d_hi = tl.load(DOC_HI + b * sdoc + offs_n, mask=n_valid, other=0)
        lo = tl.maximum(lo, tl.min(d_lo, 0) - Q_OFFSET)
        hi = tl.minimum(hi, tl.max(d_hi, 0) - Q_OFFSET)
    lo = (tl.maximum(lo, 0) // BLOCK_M) * BLOCK_M
    mid = tl.cdiv(tl.maximum(mid, 0), BLOCK_M) * BLOCK_M
    mid = tl.maximum(lo, tl.minimum(mid, hi))
    # query tiles in [b1, b2) lie inside the key tile's document run: no document compare there
    b1 = hi
    b2 = hi
    in_lo = lo  # query tiles [in_lo, in_hi) lie inside the key tile's run (none without documents)
    in_hi = lo
    if HAS_DOCS:
        last_k = tl.minimum(start_n + BLOCK_N, T_K) - 1
        in_lo, in_hi = _full_range(RUN_LO, RUN_HI, b * sdoc, start_n, last_k, Q_OFFSET, T_Q, BLOCK_M)
        b1 = tl.minimum(tl.maximum(in_lo, mid), hi)
        b2 = tl.minimum(tl.maximum(in_hi, b1), hi)
    else:
        b1 = mid
    return lo, mid, b1, b2, hi, in_lo, in_hi, k_doc


@triton.jit
def _key_tile(HKV, T_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's key tile: (b, hk, start_n, offs_n, offs_m0, offs_d, n_valid), batch and head int64 (see
    :func:`_query_tile`)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    return b, hk, start_n, offs_n, offs_m0, offs_d, offs_n < T_K


@triton.jit
def _bwd_kv_head(
    state,
    key,
    queries,
    plan,
    scale_log2,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """(dk, dv) of the key tile plus one query head's share, over the query tiles of ``plan`` = (lo, mid, b1, b2,
    hi, in_lo, in_hi) from :func:`_key_tile_query_range`: [lo, mid) with the positional mask, [mid, b1) and
    [b2, hi) with the document compare, [b1, b2) inside the key tile's run with neither."""
    lo, mid, b1, b2, hi, in_lo, in_hi = plan
    state = _bwd_kv_tiles(
        state, key, queries, (lo, mid, mid, 0, in_lo, in_hi), scale_log2, MASK_KIND, HAS_DOCS, True, BLOCK_M,
        DOT_PRECISION, USE_TMA,
    )  # fmt: skip
    if HAS_DOCS:
        state = _bwd_kv_tiles(
            state, key, queries, (mid, hi - (b2 - b1), b1, b2 - b1, in_lo, in_hi), scale_log2, MASK_KIND, True,
            False, BLOCK_M, DOT_PRECISION, USE_TMA,
        )  # fmt: skip
    return _bwd_kv_tiles(
        state, key, queries, (b1, b2, b2, 0, in_lo, in_hi), scale_log2, MASK_KIND, False, False, BLOCK_M,
        DOT_PRECISION, USE_TMA,
    )  # fmt: skip


@_autotune("bwd_kv", ("USE_TMA",))
@triton.jit
def _bwd_kv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DOCS,
    DOC_LO,
    DOC_HI,
    RUN_LO,
    RUN_HI,
    PREFIX,
    scale_log2,
    scale,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdob,
    sdoh,
    sdot,
    sdkb,
    sdkh,
    sdkt,
    sdvb,
    sdvh,
    sdvt,
    sdoc,
    HQ,
    HKV,
    GROUP,
    T_Q,
    T_K,
    Q_OFFSET,
    SEQ_BUCKET,
    GROUP_KEY,
    DEVICE_KEY,
    HEAD_DIM: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, hk, start_n, offs_n, offs_m0, offs_d, n_valid = _key_tile(HKV, T_K, BLOCK_M, BLOCK_N, HEAD_DIM)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
    plen = 0
    if MASK_KIND == 2:
        plen = tl.load(PREFIX + b)
    lo, mid, b1, b2, hi, in_lo, in_hi, k_doc = _key_tile_query_range(
        start_n, b, T_Q, T_K, Q_OFFSET, plen, offs_n, n_valid, DOCS, DOC_LO, DOC_HI, RUN_LO, RUN_HI, sdoc, MASK_KIND,
        HAS_DOCS, BLOCK_M, BLOCK_N,
    )  # fmt: skip
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        if USE_TMA:  # one 2-D descriptor per (batch, query head) over (T_Q, D)
            q_base = tl.make_tensor_descriptor(q_base, [T_Q, HEAD_DIM], [sqt, 1], [BLOCK_M, HEAD_DIM])
            do_base = tl.make_tensor_descriptor(do_base, [T_Q, HEAD_DIM], [sdot, 1], [BLOCK_M, HEAD_DIM])
        lse_base = LSE + (b * HQ + h) * T_Q
        delta_base = DELTA + (b * HQ + h) * T_Q
        queries = (q_base, do_base, lse_base, delta_base, sqt, sdot, T_Q, Q_OFFSET, DOCS, b, sdoc, offs_m0, offs_d)
        dk, dv = _bwd_kv_head(
            (dk, dv), (k, v, offs_n, k_doc, plen), queries, (lo, mid, b1, b2, hi, in_lo, in_hi), scale_log2,
            MASK_KIND, HAS_DOCS, BLOCK_M, DOT_PRECISION, USE_TMA,
        )  # fmt: skip
    dk = dk * scale
    dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_valid[:, None])
    dv_ptrs = DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


@triton.jit
def _bwd_q_tiles(
    state,
    query,
    keys,
    tiles,
    scale_log2,
    MASK_KIND: tl.constexpr,
    DOC_MASK: tl.constexpr,
    POS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """dq of the query tile ``query`` = (q, do, lse2, delta, q_pos, q_doc, plen) over the key tiles [lo, hi) but
    [skip_at, skip_at + skip_len); ``keys`` as for :func:`_fwd_tiles`."""
    (dq,) = state
    q, do, lse2, delta, q_pos, q_doc, plen = query
    k_base, v_base, skt, svt, DOCS, b, sdoc, T_K, offs_n0, offs_d = keys
    lo, hi, skip_at, skip_len, in_lo, in_hi = tiles
    for it in range(lo, hi, BLOCK_N):
        start_n = it + (it >= skip_at) * skip_len  # [skip_at, skip_at + skip_len) is left out
        offs_n = start_n + offs_n0
        n_valid = offs_n < T_K
        # keys past T_K load as zeros; they only occur on the positional tiles (the ragged last one), masked below
        if USE_TMA:  # k_base and v_base are tensor descriptors: rows past T_K come back as zeros
            k = k_base.load([start_n, 0])
            v = v_base.load([start_n, 0])
        else:
            k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=n_valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(tl.fma(qk, scale_log2, -lse2[:, None]))
        if POS_MASK:
            # keys past T_K (zeros) need the bound: with lse2 < -126 their p = exp2(-lse2) would overflow, and
            # inf * 0 in dq is NaN
            ok = _pos_mask(q_pos, offs_n, plen, MASK_KIND) & n_valid[None, :]
            if DOC_MASK:
                if (start_n < in_lo) | (start_n >= in_hi):  # else the key tile lies inside the query tile's run
                    k_doc = tl.load(DOCS + b * sdoc + offs_n, mask=n_valid, other=-1)
                    ok = ok & (q_doc[:, None] == k_doc[None, :])
            p = tl.where(ok, p, 0.0)
        elif DOC_MASK:
            k_doc = tl.load(DOCS + b * sdoc + offs_n, mask=n_valid, other=-1)
            p = tl.where(q_doc[:, None] == k_doc[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@_autotune("bwd_q", ("USE_TMA",))
@triton.jit
def _bwd_q_kernel(
    Q,
    K,
    V,
    DO,
    O,
    LSE,
    DELTA,
    DQ,
    DOCS,
    DOC_LO,
    DOC_HI,
    RUN_LO,
    RUN_HI,
    PREFIX,
    scale_log2,
    scale,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sdob,
    sdoh,
    sdot,
    sob,
    soh,
    sot,
    sdqb,
    sdqh,
    sdqt,
    sdoc,
    H,
    GROUP,
    T_Q,
    T_K,
    Q_OFFSET,
    SEQ_BUCKET,
    GROUP_KEY,
    DEVICE_KEY,
    HEAD_DIM: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh, b, h, hk, start_m, offs_m, offs_n0, offs_d, m_valid, q_pos = _query_tile(
        H, GROUP, T_Q, Q_OFFSET, BLOCK_M, BLOCK_N, HEAD_DIM
    )
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    lse2 = tl.load(LSE + pid_bh * T_Q + offs_m, mask=m_valid, other=float("inf"))
    # delta = rowsum(dO * O) = rowsum(P * dP) in fp32, computed here (no separate pass over O and dO) and stored
    # for the dK/dV kernel, which runs after this one
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=m_valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T_Q + offs_m, delta, mask=m_valid)
    plen, q_doc, k_base, v_base, lo, mid, hi, a1, a2, f_lo, f_hi = _key_plan(
        (DOCS, DOC_LO, DOC_HI, RUN_LO, RUN_HI, PREFIX, sdoc), (K, V, skb, skh, skt, svb, svh, svt), b, hk, start_m,
        q_pos, m_valid, (T_Q, T_K, Q_OFFSET), MASK_KIND, HAS_DOCS, USE_TMA, BLOCK_M, BLOCK_N, HEAD_DIM,
    )  # fmt: skip
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # the forward's split of the key range
    query = (q, do, lse2, delta, q_pos, q_doc, plen)
    keys = (k_base, v_base, skt, svt, DOCS, b, sdoc, T_K, offs_n0, offs_d)
    if HAS_DOCS:
        dq = _bwd_q_tiles(
            (dq,), query, keys, (lo, mid - (a2 - a1), a1, a2 - a1, f_lo, f_hi), scale_log2, MASK_KIND, True, False,
            BLOCK_N, DOT_PRECISION, USE_TMA,
        )  # fmt: skip
    dq = _bwd_q_tiles(
        (dq,), query, keys, (a1, a2, a2, 0, f_lo, f_hi), scale_log2, MASK_KIND, False, False, BLOCK_N, DOT_PRECISION,
        USE_TMA,
    )  # fmt: skip
    dq = _bwd_q_tiles(
        (dq,), query, keys, (mid, hi, hi, 0, f_lo, f_hi), scale_log2, MASK_KIND, HAS_DOCS, True, BLOCK_N,
        DOT_PRECISION, USE_TMA,
    )  # fmt: skip
    dq = dq * scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_valid[:, None],
    )


# ---------------------------------------------------------------------------------------------------- host side


def document_spans(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the first position and one past the last position of its document id in that row.

    Works for any layout of ids (a document may come back after another one), without a host sync.
    Returns two int32 (B, T) tensors.
    """
    b, t = doc_ids.shape
    sorted_ids, order = torch.sort(doc_ids, dim=1, stable=True)  # positions ascend within one id
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    run = torch.cumsum(new_run.to(torch.int64), dim=1) - 1  # (B, T): which distinct id, in sorted order
    first = torch.full((b, t), t, dtype=torch.int64, device=doc_ids.device)
    first.scatter_reduce_(1, run, order, reduce="amin")
    last = torch.zeros((b, t), dtype=torch.int64, device=doc_ids.device)
    last.scatter_reduce_(1, run, order, reduce="amax")
    lo_sorted = first.gather(1, run)
    hi_sorted = last.gather(1, run) + 1
    lo = torch.empty_like(lo_sorted).scatter_(1, order, lo_sorted)
    hi = torch.empty_like(hi_sorted).scatter_(1, order, hi_sorted)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def run_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the first position and one past the last position of its run: the longest stretch of equal
    ids around it. Equal to :func:`document_spans` when every document is one contiguous run. The kernels use it
    to find tiles that lie inside one document (no element-wise document compare there). Two int32 (B, T) tensors.
    """
    b, t = doc_ids.shape
    pos = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones((b, t), dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    lo = torch.where(starts, pos, 0).cummax(dim=1).values
    hi = torch.where(ends, pos + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def document_tiles(doc_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`document_spans` and :func:`run_bounds` together: what ``flash_attention(doc_spans=...)`` takes."""
    return (*document_spans(doc_ids), *run_bounds(doc_ids))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flash_attention wants q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim {d} is not supported by the Triton kernel (powers of two from 16 to 256)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one of float16, bfloat16, float32")


# MEGATRON_DUAL_ATTN_TMA=1: on sm90 (Triton with device-side tensor descriptors, >= 3.6) the kernels load the tiles
# they stream (the forward's and dQ's key/value tiles, dK/dV's query and output-gradient tiles) through TMA
# descriptors (bulk asynchronous copies) instead of pointer arithmetic; experimental, off by default, not yet measured
# on a GPU. Read at import; the tests switch it through this attribute.
TMA = os.environ.get("MEGATRON_DUAL_ATTN_TMA", "0") == "1"


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Whether a kernel loads ``tensors`` (the forward's and dQ's k and v, dK/dV's q and dO) through TMA descriptors:
    the flag, an sm90 device (or the interpreter), and 16-byte aligned bases and strides (TMA's requirement). Sets
    Triton's allocator for the descriptors' scratch memory each time: Triton keeps it per thread (a ContextVar), and
    autograd runs the backward on a thread of its own."""
    if not TMA or not hasattr(tl, "make_tensor_descriptor"):
        return False
    device = tensors[0].device
    if not INTERPRET and device_arch(device) != "sm90":
        return False
    if not all(
        x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in x.stride()[:-1]) for x in tensors
    ):
        return False
    if not INTERPRET:  # device-side descriptors live in a global scratch buffer
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=device))
    return True


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class _Meta:
    """What the kernels need to know about the mask, prepared once per call."""

    def __init__(
        self,
        kind: str,
        doc_ids: torch.Tensor | None,
        prefix_len: torch.Tensor | int | None,
        q_offset: int,
        q_len: int,
        k_len: int,
        batch: int,
        device: torch.device,
        spans: tuple[torch.Tensor, ...] | None,
    ) -> None:
        if kind not in MASK_CODES:
            raise ValueError(f"mask kind {kind!r}; allowed: {', '.join(MASK_CODES)}")
        self.code = MASK_CODES[kind]
        self.q_offset = int(q_offset)
        if self.q_offset < 0:
            raise ValueError(f"q_offset = {q_offset} must be >= 0")
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        if kind == "prefix":
            if prefix_len is None:
                raise ValueError("the prefix mask needs prefix_len (B,)")
            plen = torch.as_tensor(prefix_len, device=device).to(torch.int32).reshape(-1)
            if plen.numel() == 1 and batch > 1:
                plen = plen.expand(batch)
            if plen.numel() != batch:
                raise ValueError(f"prefix_len has {plen.numel()} entries for a batch of {batch}")
            self.prefix = plen.contiguous()
        else:
            self.prefix = dummy
        self.has_docs = doc_ids is not None
        self._set_docs(doc_ids, spans, q_len, k_len, batch, device, dummy)

    def doc_args(self) -> tuple[torch.Tensor, ...]:
        """The mask tensors every kernel takes, in its argument order."""
        return self.docs, self.doc_lo, self.doc_hi, self.run_lo, self.run_hi, self.prefix

    def _set_docs(
        self,
        doc_ids: torch.Tensor | None,
        spans: tuple[torch.Tensor, ...] | None,
        q_len: int,
        k_len: int,
        batch: int,
        device: torch.device,
        dummy: torch.Tensor,
    ) -> None:
        if doc_ids is not None:
            if doc_ids.shape != (batch, k_len):
                raise ValueError(f"doc_ids of shape {tuple(doc_ids.shape)}; expected (B, Tk) = ({batch}, {k_len})")
            if self.q_offset + q_len > k_len:
                raise ValueError(
                    f"queries at positions {self.q_offset}..{self.q_offset + q_len - 1} have no "
                    f"document id (doc_ids cover {k_len} keys)"
                )
            self.docs = doc_ids.to(device=device, dtype=torch.int32).contiguous()
            if spans is None:
                spans = document_tiles(self.docs)
            elif len(spans) == 2:  # document spans only (the older form): the runs are derived here
                spans = (*spans, *run_bounds(self.docs))
            self.doc_lo, self.doc_hi, self.run_lo, self.run_hi = (x.to(torch.int32).contiguous() for x in spans)
        else:
            self.docs = self.doc_lo = self.doc_hi = self.run_lo = self.run_hi = dummy


_I32_MAX = 2**31 - 1


def _strides(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The strides of the first three dimensions of each tensor, in order (the kernels take them flat).

    The kernels add batch and head offsets in int64 but keep the in-tile offsets ``t * stride_t + d`` in int32 (a
    stride >= 2^31 reaches them as int64 anyway: Triton passes such an argument as i64); check that they fit."""
    for t in tensors:
        _, _, n, d = t.shape
        if t.stride(2) <= _I32_MAX and (n - 1) * t.stride(2) + d - 1 > _I32_MAX:
            raise ValueError(
                f"a (B, H, T, D) = {tuple(t.shape)} operand with T stride {t.stride(2)} spans more than 2^31 elements "
                "along one sequence; the attention kernel's in-tile offsets are 32-bit"
            )
    return tuple(st for t in tensors for st in t.stride()[:3])


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: _Meta, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    # (B, T, H, D) in memory, returned as a (B, H, T, D) view: o.transpose(1, 2).reshape(B, T, H * D), what the
    # output projection takes, is then a view (no transpose copy after the kernel)
    o = torch.empty((b, tq, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32 inputs: exact products, not tf32

    def grid(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(tq, meta_["BLOCK_M"]), b * hq

    _fwd_kernel[grid](
        q, k, v, o, lse, *meta.doc_args(), scale * _LOG2E,
        *_strides(q, k, v, o), meta.docs.stride(0),
        hq, hq // hkv, tq, tk, meta.q_offset, _bucket(max(tq, tk)), min(hq // hkv, 8), _device_key(q.device),
        HEAD_DIM=d, MASK_KIND=meta.code, HAS_DOCS=meta.has_docs, DOT_PRECISION=precision, USE_TMA=_use_tma(k, v),
    )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    meta: _Meta,
    scale: float,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv; written into ``grads`` (views of shapes q, k, v with a unit last stride) when given."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    do = _unit_last(do)
    delta = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)  # written by the dq kernel
    dq, dk, dv = grads if grads is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    group = hq // hkv
    tail = (meta.q_offset, _bucket(max(tq, tk)), min(group, 8), _device_key(q.device))
    consts = dict(
        HEAD_DIM=d,
        MASK_KIND=meta.code,
        HAS_DOCS=meta.has_docs,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32 inputs: exact products, not tf32
    )

    def grid_q(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(tq, meta_["BLOCK_M"]), b * hq

    _bwd_q_kernel[grid_q](
        q, k, v, do, o, lse, delta, dq, *meta.doc_args(), scale * _LOG2E, scale,
        *_strides(q, k, v, do, o, dq), meta.docs.stride(0), hq, group, tq, tk, *tail, **consts,
        USE_TMA=_use_tma(k, v),
    )  # fmt: skip

    def grid_kv(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(tk, meta_["BLOCK_N"]), b * hkv

    _bwd_kv_kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv, *meta.doc_args(), scale * _LOG2E, scale,
        *_strides(q, k, v, do, dk, dv), meta.docs.stride(0), hq, hkv, group, tq, tk, *tail, **consts,
        USE_TMA=_use_tma(q, do),
    )  # fmt: skip
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v with the log-sum-exp saved and probabilities recomputed in backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: _Meta,
        scale: float,
    ) -> torch.Tensor:
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        o, lse = _forward(q, k, v, meta, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta, ctx.scale = meta, scale
        return o

    @staticmethod
    @once_differentiable  # a double backward through the kernels is an error, not a silent zero
    def backward(
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.meta, ctx.scale)
        return dq, dk, dv, None, None


class FlashAttentionQKVFunction(torch.autograd.Function):
    """Rotary + attention on the fused projection's output (B, T, (Hq + 2 Hkv) * D), returning (B, T, Hq * D).

    The q and k heads are rotated in place on ``qkv`` (the function marks it dirty and returns it as its second
    output); the backward writes dq, dk and dv into one packed buffer of the projection's layout and applies the
    inverse rotation in place on it, so autograd neither splits nor concatenates anything.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        heads: tuple[int, int, int],
        meta: _Meta,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from megatron_dual.kernels.rotary import rotate_heads_

        hq, hkv, d = heads
        b, t, _ = qkv.shape
        packed = qkv.view(b, t, hq + 2 * hkv, d)
        rotate_heads_(packed[:, :, : hq + hkv], cos, sin)
        q, k, v = (x.transpose(1, 2) for x in packed.split([hq, hkv, hkv], dim=2))
        o, lse = _forward(q, k, v, meta, scale)
        ctx.mark_dirty(qkv)
        ctx.set_materialize_grads(False)  # the returned qkv gets no gradient in the model: no zero tensor for it
        ctx.save_for_backward(qkv, o, lse, cos, sin)
        ctx.meta, ctx.scale, ctx.heads = meta, scale, heads
        return o.transpose(1, 2).reshape(b, t, hq * d), qkv

    @staticmethod
    @once_differentiable  # a double backward through the kernels is an error, not a silent zero
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor | None, dqkv_out: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        from megatron_dual.kernels.rotary import rotate_heads_

        qkv, o, lse, cos, sin = ctx.saved_tensors
        hq, hkv, d = ctx.heads
        b, t, _ = qkv.shape
        if dy is None and dqkv_out is None:
            return None, None, None, None, None, None
        dqkv = torch.zeros_like(qkv) if dy is None else torch.empty_like(qkv, memory_format=torch.contiguous_format)
        grads = dqkv.view(b, t, hq + 2 * hkv, d)
        if dy is not None:
            packed = qkv.view(b, t, hq + 2 * hkv, d)
            q, k, v = (x.transpose(1, 2) for x in packed.split([hq, hkv, hkv], dim=2))
            do = dy.reshape(b, t, hq, d).transpose(1, 2)
            views = tuple(x.transpose(1, 2) for x in grads.split([hq, hkv, hkv], dim=2))
            _backward(do, q, k, v, o, lse, ctx.meta, ctx.scale, grads=views)  # type: ignore[arg-type]
        if dqkv_out is not None:  # someone used the rotated qkv: its gradient joins before the inverse rotation
            dqkv += dqkv_out
        rotate_heads_(grads[:, :, : hq + hkv], cos, sin, inverse=True)
        return dqkv, None, None, None, None, None


def flash_attention_qkv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    kind: str = "causal",
    *,
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | int | None = None,
    softmax_scale: float | None = None,
    doc_spans: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Rotary embedding (rotate-half, ``cos``/``sin`` (T, D) or (B, T, D)) and attention on a fused projection.

    ``qkv`` (B, T, (Hq + 2 Hkv) * D) is the projection's output, [q heads | k heads | v heads]; it is rotated in
    place (as :func:`megatron_dual.kernels.rotary.rotary_qkv_` does; a ``qkv`` that autograd tracks as a view of another
    tensor, e.g. a biased ``F.linear``'s 3-D output or a slice, is copied first and left as it is: autograd cannot
    mark a view dirty in a function with two outputs). Returns the attention output (B, T, Hq * D)
    for the output projection; its gradient reaches ``qkv`` as one packed tensor. Masks as in
    :func:`flash_attention` (queries and keys are the same T positions, so no ``q_offset``).
    """
    if qkv.dim() != 3 or qkv.stride(-1) != 1 or qkv.shape[-1] % (n_heads + 2 * n_kv_heads):
        raise ValueError(
            f"qkv of shape {tuple(qkv.shape)} is not (B, T, (Hq + 2 Hkv) * D) with a unit last stride "
            f"for Hq = {n_heads}, Hkv = {n_kv_heads}"
        )
    b, t, width = qkv.shape
    d = width // (n_heads + 2 * n_kv_heads)
    shapes = ((b, n_heads, t, d), (b, n_kv_heads, t, d), (b, n_kv_heads, t, d))
    _check_inputs(*(torch.empty(x, dtype=qkv.dtype, device="meta") for x in shapes))
    if qkv.device.type == "cpu" and not INTERPRET:
        raise RuntimeError("the Triton attention kernel runs on CPU only under TRITON_INTERPRET=1")
    meta = _Meta(kind, doc_ids, prefix_len, 0, t, t, b, qkv.device, doc_spans)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if qkv._is_view() and qkv.requires_grad and torch.is_grad_enabled():
        qkv = qkv.clone()  # the model's bias-free projection output is no view: no copy there
    y, _ = FlashAttentionQKVFunction.apply(qkv, cos, sin, (n_heads, n_kv_heads, d), meta, scale)
    return y


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "causal",
    *,
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | int | None = None,
    q_offset: int = 0,
    softmax_scale: float | None = None,
    doc_spans: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Masked attention through the Triton kernels; differentiable in q, k and v.

    kind: ``causal``, ``bidirectional`` or ``prefix`` (then ``prefix_len``, (B,) or a scalar). ``doc_ids`` (B, Tk)
    restricts every query to keys of its own document. ``doc_spans`` may pass precomputed :func:`document_tiles`
    (or just :func:`document_spans`); the model computes them once per mask for all layers.
    """
    _check_inputs(q, k, v)
    if q.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "the Triton attention kernel runs on CPU only under TRITON_INTERPRET=1 (set before "
            "megatron_dual.kernels.attention is imported)"
        )
    meta = _Meta(kind, doc_ids, prefix_len, q_offset, q.shape[2], k.shape[2], q.shape[0], q.device, doc_spans)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return FlashAttentionFunction.apply(q, k, v, meta, scale)


class FlashAttention(torch.nn.Module):
    """Module form of :func:`flash_attention` with a fixed mask kind."""

    def __init__(self, kind: str = "causal", softmax_scale: float | None = None) -> None:
        super().__init__()
        if kind not in MASK_CODES:
            raise ValueError(f"mask kind {kind!r}; allowed: {', '.join(MASK_CODES)}")
        self.kind, self.softmax_scale = kind, softmax_scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | int | None = None,
        q_offset: int = 0,
    ) -> torch.Tensor:
        return flash_attention(
            q,
            k,
            v,
            self.kind,
            doc_ids=doc_ids,
            prefix_len=prefix_len,
            q_offset=q_offset,
            softmax_scale=self.softmax_scale,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
