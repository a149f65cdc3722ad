"""One attention entry point for every mask the dual objective needs, and the choice of backend.

``attention(q, k, v, mask, backend)`` takes q of shape (B, Hq, Tq, D) and k, v of shape (B, Hkv, Tk, D) (GQA when
Hkv < Hq) and an :class:`AttentionMask`. Backends:

* ``sdpa``: PyTorch SDPA, with a dense boolean mask for documents and prefixes; runs everywhere (the CPU path).
* ``triton``: our flash-attention kernels (``megatron_dual.kernels.attention``), every mask; CUDA or ROCm, or CPU
  under ``TRITON_INTERPRET=1`` (set before the kernels are first imported), for tests.
* ``flash``: flash-attn where installed (fp16/bf16 on GPU); documents through the varlen interface when every
  document id is one contiguous run; no prefix-LM mask.
* ``flex``: torch FlexAttention with a block mask built from the same mask (compiled on GPU, eager on CPU).
* ``auto``: flash-attn where installed and the call is supported, else Triton on GPU, else SDPA.

The backend a call resolves to is logged once per distinct choice; a backend that cannot run a call (say a prefix
mask on flash-attn) falls back with a one-line notice, never to a silently wrong answer. ``reference_attention``
is the fp32 ground truth every backend is tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

MASK_KINDS = ("causal", "bidirectional", "prefix")
BACKENDS = ("auto", "sdpa", "triton", "flash", "flex")

_logger = logging.getLogger("megatron_dual.attention")


@dataclass
class AttentionMask:
    """What may attend to what.

    kind: ``causal`` (key position <= query position), ``bidirectional`` (all), or ``prefix`` (bidirectional inside
    the first ``prefix_len[b]`` positions, causal after them).
    doc_ids: optional (B, Tk) integer ids; a query never attends to a key of another document.
    q_offset: absolute position of the first query (non-zero when decoding with a KV cache).
    """

    kind: str = "causal"
    doc_ids: torch.Tensor | None = None
    prefix_len: torch.Tensor | None = None
    q_offset: int = 0
    # per-mask derived tensors (document spans, cu_seqlens, Flex block masks), computed once for all layers
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"AttentionMask.kind = {self.kind!r}; allowed: {', '.join(MASK_KINDS)}")
        if self.kind == "prefix" and self.prefix_len is None:
            raise ValueError("AttentionMask(kind='prefix') needs prefix_len, a (B,) tensor of prefix lengths")

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

    def derived(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` cached on this mask under ``key`` (the mask's tensors must not change after first use)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def dense(self, q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Boolean mask broadcastable to (B, 1, q_len, k_len), True where attention is allowed; None = no mask."""
        q_pos = torch.arange(self.q_offset, self.q_offset + q_len, device=device)
        k_pos = torch.arange(k_len, device=device)
        allowed: torch.Tensor | None = None
        if self.kind == "causal":
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
        elif self.kind == "prefix":
            plen = self.prefix_len.to(device).view(-1, 1, 1, 1)  # type: ignore[union-attr]
            causal = (k_pos[None, :] <= q_pos[:, None])[None, None]
            allowed = causal | (k_pos.view(1, 1, 1, -1) < plen)
        if self.doc_ids is not None:
            docs = self.doc_ids.to(device)
            if docs.shape[-1] != k_len:
                raise ValueError(f"doc_ids cover {docs.shape[-1]} positions but there are {k_len} keys")
            q_docs = docs[:, self.q_offset : self.q_offset + q_len]
            same = (q_docs[:, :, None] == docs[:, None, :])[:, None]
            allowed = same if allowed is None else allowed & same
        return allowed


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    q_len, k_len = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if mask.doc_ids is None and mask.kind == "bidirectional":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask.doc_ids is None and mask.kind == "causal" and mask.q_offset == 0 and q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q_len, k_len, q.device), enable_gqa=gqa)


@dataclass(frozen=True)
class Capabilities:
    """What this process could run: optional packages found, and whether Triton runs in its CPU interpreter."""

    triton: bool
    flash: bool
    flex: bool
    interpret: bool


@functools.cache
def _installed() -> tuple[bool, bool, bool]:
    triton = importlib.util.find_spec("triton") is not None
    flash = importlib.util.find_spec("flash_attn") is not None
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return triton, flash, flex


def capabilities() -> Capabilities:
    triton, flash, flex = _installed()
    return Capabilities(triton, flash, flex, os.environ.get("TRITON_INTERPRET", "0") == "1")


def _pow2_head_dim(d: int) -> bool:
    return 16 <= d <= 256 and d & (d - 1) == 0


def _triton_unsupported(
    device: str, dtype: torch.dtype, head_dim: int, mask: AttentionMask, q_len: int, k_len: int, caps: Capabilities
) -> str | None:
    if not caps.triton:
        return "triton is not installed"
    if device == "cpu" and not caps.interpret:
        return "the Triton kernel needs a GPU (or TRITON_INTERPRET=1 on CPU)"
    if device not in ("cuda", "cpu"):
        return f"the Triton kernel does not run on {device}"
    if not _pow2_head_dim(head_dim):
        return f"head dim {head_dim} is not a power of two in [16, 256]"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} is not float16, bfloat16 or float32"
    if mask.doc_ids is not None and mask.q_offset + q_len > k_len:
        return "queries beyond the document ids"
    return None


def _flash_mask_unsupported(mask: AttentionMask, q_len: int, k_len: int) -> str | None:
    if mask.kind == "prefix":
        return "flash-attn has no prefix-LM mask"
    if mask.doc_ids is not None and (mask.q_offset != 0 or q_len != k_len):
        return "document masks go through flash-attn varlen, which needs Tq == Tk and q_offset 0"
    if mask.kind == "causal" and mask.q_offset != k_len - q_len:
        return "flash-attn aligns a causal mask to the last key (needs q_offset == Tk - Tq)"
    return None


def _flash_unsupported(
    device: str, dtype: torch.dtype, head_dim: int, mask: AttentionMask, q_len: int, k_len: int, caps: Capabilities
) -> str | None:
    if not caps.flash:
        return "flash-attn is not installed"
    if device != "cuda":
        return "flash-attn needs a GPU"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, not {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"flash-attn does not take head dim {head_dim}"
    return _flash_mask_unsupported(mask, q_len, k_len)


def _flex_unsupported(
    device: str, dtype: torch.dtype, head_dim: int, mask: AttentionMask, q_len: int, k_len: int, caps: Capabilities
) -> str | None:
    if not caps.flex:
        return "this torch has no FlexAttention"
    if device not in ("cuda", "cpu"):
        return f"FlexAttention is not wired up for {device}"
    if not _pow2_head_dim(head_dim):
        return f"head dim {head_dim} is not a power of two in [16, 256]"
    if mask.doc_ids is not None and mask.q_offset + q_len > k_len:
        return "queries beyond the document ids"
    return None


_UNSUPPORTED = {"triton": _triton_unsupported, "flash": _flash_unsupported, "flex": _flex_unsupported}


def unsupported(
    backend: str,
    *,
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    mask: AttentionMask,
    q_len: int,
    k_len: int,
    caps: Capabilities,
) -> str | None:
    """Why ``backend`` cannot run this call, or None when it can (decided from shapes and flags, no data)."""
    if backend == "sdpa":
        return None
    if backend not in _UNSUPPORTED:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    return _UNSUPPORTED[backend](device, dtype, head_dim, mask, q_len, k_len, caps)


def select_backend(
    requested: str,
    *,
    device: str,
    dtype: torch.dtype,
    head_dim: int,
    mask: AttentionMask,
    q_len: int,
    k_len: int,
    caps: Capabilities | None = None,
) -> tuple[str, str]:
    """Resolve ``requested`` to a backend that can run the call; returns (backend, one-line explanation).

    ``auto``: flash-attn, else Triton, on GPU; SDPA on CPU. An explicit backend that cannot run the call falls back
    to the next correct one (flash -> triton -> sdpa on GPU, anything -> sdpa) and the explanation says why.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not available; choose one of {', '.join(BACKENDS)}")
    caps = caps or capabilities()
    args = dict(device=device, dtype=dtype, head_dim=head_dim, mask=mask, q_len=q_len, k_len=k_len, caps=caps)
    if requested == "auto":
        candidates = ["flash", "triton", "sdpa"] if device == "cuda" else ["sdpa"]
        skipped = []
        for name in candidates:
            reason = unsupported(name, **args)
            if reason is None:
                why = f" ({'; '.join(skipped)})" if skipped else ""
                return name, f"attention backend auto -> {name} on {device}{why}"
            skipped.append(f"not {name}: {reason}")
    reason = unsupported(requested, **args)
    if reason is None:
        return requested, f"attention backend {requested} on {device}"
    chain = {"flash": ["triton", "sdpa"]}.get(requested, ["sdpa"])
    for name in chain:
        if unsupported(name, **args) is None:
            return name, f"attention backend {requested} cannot run this call ({reason}); falling back to {name}"
    raise AssertionError("sdpa runs every call")  # pragma: no cover


_said: set[str] = set()


def _say_once(message: str, warn: bool) -> None:
    if message in _said:
        return
    _said.add(message)
    if logging.getLogger().hasHandlers():
        _logger.log(logging.WARNING if warn else logging.INFO, message)
    else:
        print(f"megatron-dual: {message}", file=sys.stderr)


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    from megatron_dual.kernels.attention import document_tiles, flash_attention

    spans = None
    if mask.doc_ids is not None:
        docs = mask.doc_ids
        spans = mask.derived(("tiles", q.device), lambda: document_tiles(docs.to(q.device)))
    return flash_attention(
        q, k, v, mask.kind, doc_ids=mask.doc_ids, prefix_len=mask.prefix_len, q_offset=mask.q_offset, doc_spans=spans
    )


def fused_qkv_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: tuple[int, int, int],
    mask: AttentionMask,
    backend: str = "auto",
) -> torch.Tensor | None:
    """Rotary + attention straight from the fused projection's output (B, T, (Hq + 2 Hkv) D) to (B, T, Hq D) when
    the call resolves to the Triton backend (then dq, dk and dv come back as one packed gradient, the rotary
    backward in place on it); None otherwise, and ``qkv`` is left untouched for the unfused path.

    heads: (Hq, Hkv, D). The caller has decided that fused kernels run (``model.fused_ops``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    n_heads, n_kv, head_dim = heads
    b, t, _ = qkv.shape
    if mask.q_offset != 0 or backend == "sdpa":
        return None
    name, message = select_backend(
        backend, device=qkv.device.type, dtype=qkv.dtype, head_dim=head_dim, mask=mask, q_len=t, k_len=t
    )
    if name != "triton":
        return None
    _say_once(message, warn=backend != "auto" and name != backend)
    from megatron_dual.kernels.attention import document_tiles, flash_attention_qkv

    spans = None
    if mask.doc_ids is not None:
        docs = mask.doc_ids
        spans = mask.derived(("tiles", qkv.device), lambda: document_tiles(docs.to(qkv.device)))
    return flash_attention_qkv(
        qkv, cos, sin, n_heads, n_kv, mask.kind, doc_ids=mask.doc_ids, prefix_len=mask.prefix_len, doc_spans=spans
    )


def document_runs(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens over the flattened (B*T) tokens, longest run) when every id is one contiguous run per row.

    None when some document id comes back after another one (then runs are not documents and varlen would let a
    document's pieces miss each other). Syncs with the host (data-dependent sizes).
    """
    b, t = doc_ids.shape
    starts = torch.ones((b, t), dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    ordered = torch.sort(doc_ids, dim=1).values
    distinct = torch.ones_like(starts)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    if not torch.equal(starts.sum(1), distinct.sum(1)):
        return None
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu = torch.cat([first, first.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor | None:
    """flash-attn on (B, T, H, D) views; None when the documents are not contiguous runs (caller falls back)."""
    import flash_attn

    b, hq, t, d = q.shape
    causal = mask.kind == "causal"
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mask.doc_ids is None:
        return flash_attn.flash_attn_func(qt, kt, vt, causal=causal).transpose(1, 2)
    docs = mask.doc_ids
    runs = mask.derived(("runs", q.device), lambda: document_runs(docs.to(q.device)))
    if runs is None:
        return None
    cu, longest = runs
    out = flash_attn.flash_attn_varlen_func(
        qt.reshape(b * t, hq, d),
        kt.reshape(b * t, k.shape[1], d),
        vt.reshape(b * t, v.shape[1], d),
        cu,
        cu,
        longest,
        longest,
        causal=causal,
    )
    return out.view(b, t, hq, d).transpose(1, 2)


def _flex_mask_mod(mask: AttentionMask, device: torch.device) -> Callable[..., torch.Tensor]:
    kind, offset = mask.kind, mask.q_offset
    docs = mask.doc_ids.to(device) if mask.doc_ids is not None else None
    plen = mask.prefix_len.to(device).reshape(-1) if mask.prefix_len is not None else None

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_pos = q_idx + offset
        ok = kv_idx >= 0
        if kind == "causal":
            ok = kv_idx <= q_pos
        elif kind == "prefix":
            ok = (kv_idx <= q_pos) | (kv_idx < plen[b if plen.numel() > 1 else 0])  # type: ignore[union-attr]
        if docs is not None:
            ok = ok & (docs[b, q_pos] == docs[b, kv_idx])
        return ok

    return mask_mod


FLEX_MAX_COMPILED = 32  # distinct compiled FlexAttention call signatures before new ones run eagerly
FLEX_COMPILE_OPTIONS: dict[str, Any] = {}  # extra torch.compile arguments for signatures compiled from now on
_FLEX_COMPILED: dict[tuple, Callable[..., torch.Tensor]] = {}


def flex_signature(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> tuple:
    """What a compiled FlexAttention specialises on (``dynamic=False``): the mask's structure, shapes, dtype, device
    and whether gradients flow; the mask's tensors (document ids, prefix lengths) are graph inputs, not part of it."""
    plen = None if mask.prefix_len is None else mask.prefix_len.numel()
    return (
        mask.kind,
        mask.doc_ids is not None,
        plen,
        mask.q_offset,
        tuple(q.shape),
        tuple(k.shape),
        q.dtype,
        str(q.device),
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad),
    )


def flex_compiled(signature: tuple) -> Callable[..., torch.Tensor] | None:
    """One ``torch.compile``d FlexAttention per call signature, compiled once and reused for every later call.

    Dynamo keeps its compiled entries, and its recompile limit (8), per code object: a single compiled
    ``flex_attention`` shared by every mask, length and dtype recompiles on each new one and, past the limit,
    silently runs the unfused eager path. Each signature therefore gets a function with a code object of its own.
    None past :data:`FLEX_MAX_COMPILED` signatures (e.g. decoding, where q_offset moves every step): eager then.
    """
    fn = _FLEX_COMPILED.get(signature)
    if fn is None and len(_FLEX_COMPILED) < FLEX_MAX_COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, gqa: bool) -> torch.Tensor:
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)

        code = call.__code__.replace(co_name=f"flex_attention_{len(_FLEX_COMPILED)}")
        own = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
        fn = _FLEX_COMPILED[signature] = torch.compile(own, dynamic=False, **FLEX_COMPILE_OPTIONS)
    return fn


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, _, tq, _ = q.shape
    tk = k.shape[2]
    block_mask = None
    if mask.kind != "bidirectional" or mask.doc_ids is not None:
        block_mask = mask.derived(
            ("flex", tq, tk, q.device),
            lambda: create_block_mask(_flex_mask_mod(mask, q.device), b, None, tq, tk, device=q.device),
        )
    gqa = q.shape[1] != k.shape[1]
    fn = flex_compiled(flex_signature(q, k, mask)) if q.is_cuda else None
    if fn is None:
        if q.is_cuda:
            _say_once(
                f"FlexAttention: {FLEX_MAX_COMPILED} call signatures compiled already; new ones run eagerly (slow)",
                warn=True,
            )
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return fn(q, k, v, block_mask, gqa)


_RUNNERS: dict[str, Callable[..., torch.Tensor | None]] = {
    "sdpa": _sdpa,
    "triton": _triton,
    "flash": _flash,
    "flex": _flex,
}


def _flex_cpu_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """A CPU call on tensors that require grad: torch's FlexAttention refuses it (NotImplementedError, as torch
    checks it: ``requires_grad`` of the inputs)."""
    return q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "auto"
) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(D)) under ``mask``; returns (B, Hq, Tq, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "flex" and _flex_cpu_backward(q, k, v):
        _say_once(
            "attention backend flex cannot run this call (FlexAttention has no backward on CPU); falling back to sdpa",
            True,
        )
        return _sdpa(q, k, v, mask)
    name, message = select_backend(
        backend,
        device=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        mask=mask,
        q_len=q.shape[2],
        k_len=k.shape[2],
    )
    _say_once(message, warn=backend != "auto" and name != backend)
    out = _RUNNERS[name](q, k, v, mask)
    if out is None:  # flash-attn with documents that are not contiguous runs
        fallback = (
            "triton"
            if unsupported(
                "triton",
                device=q.device.type,
                dtype=q.dtype,
                head_dim=q.shape[-1],
                mask=mask,
                q_len=q.shape[2],
                k_len=k.shape[2],
                caps=capabilities(),
            )
            is None
            else "sdpa"
        )
        _say_once(
            f"attention backend {name}: document ids are not contiguous runs, so varlen cannot express them; "
            f"falling back to {fallback}",
            warn=True,
        )
        out = _RUNNERS[fallback](q, k, v, mask)
    return out  # type: ignore[return-value]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Plain softmax(QK^T/sqrt(D))V in fp32 with the dense mask: the ground truth for every backend test."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = mask.dense(q.shape[-2], k.shape[-2], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)
