"""One attention entry point for every mask the dual objective needs.

``attention(q, k, v, mask)`` takes q of shape (B, Hq, Tq, D) and k, v of shape (B, Hkv, Tk, D) (GQA when
Hkv < Hq) and an :class:`AttentionMask`. The SDPA backend with a dense boolean mask is the CPU path and the
reference that later kernels (Triton, flash-attn, FlexAttention) are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_KINDS = ("causal", "bidirectional", "prefix")
BACKENDS = ("auto", "sdpa")


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

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"AttentionMask.kind = {self.kind!r}; allowed: {', '.join(MASK_KINDS)}")
        if self.kind == "prefix" and self.prefix_len is None:
            raise ValueError("AttentionMask(kind='prefix') needs prefix_len, a (B,) tensor of prefix lengths")

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal"

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


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "auto"
) -> torch.Tensor:
    """Scaled dot-product attention (scale 1/sqrt(D)) under ``mask``; returns (B, Hq, Tq, D)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    return _sdpa(q, k, v, mask)


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
