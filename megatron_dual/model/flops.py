"""Model FLOPs, as the training step executes them, and the peaks to hold them against (MFU).

Accounting (PaLM-style model FLOPs, the convention of MFU): matmuls only, 2 FLOPs per multiply-add, training =
3 x forward (backward = 2 x forward); recomputation (activation checkpointing, the attention backward's second
``QK^T``) is not counted, and neither are norms, activations or the softmax.

* Dense matmuls per token and layer: qkv, attention output, SwiGLU up/gate and down at the *logical* MLP width
  (``model.intermediate_size``; padding to an aligned width adds executed but not model FLOPs).
* Attention: ``4 * head_dim * n_heads`` forward FLOPs per (query, key) pair the mask allows (``QK^T`` and ``PV``),
  counted exactly per mask by :func:`attention_pairs` (documents, causal, bidirectional, prefix). A block-skipping
  kernel executes whole tiles, so it does a little more work on straddling tiles; that excess is not credited.
* Head: ``RMSNorm -> Linear(h, h) -> GELU -> Linear(h, vocab)`` runs on the labelled positions only (the loss never
  computes logits elsewhere), so an MD micro-batch that labels a fraction t of its tokens pays the head on t only.

:func:`flops_per_token` is the old per-token estimate (one sequence of ``seq_len``, no documents, every position
labelled) kept for ``megatron-dual info`` and the benchmarks' headline numbers; :func:`batch_train_flops` is the
honest count for an actual batch. Peaks: :func:`peak_flops` by exact device name (dense, no sparsity, bf16).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from megatron_dual.model.loss import IGNORE

if TYPE_CHECKING:
    from megatron_dual.config import ModelConfig
    from megatron_dual.model.attention import AttentionMask


class Peak(NamedTuple):
    label: str  # the part the name was matched to, e.g. "H100 SXM"
    flops: float  # dense bf16 tensor-core FLOP/s (no 2:4 sparsity)


# Vendor datasheets, dense bf16 (the sparse figure halved where only that is printed). Matched in order on the
# lower-cased device name: every token of the pattern must occur in it. ROCm shows one MI250X GCD as one device,
# so its entry is half the 383 TF/s of the two-die module.
PEAKS: tuple[tuple[tuple[str, ...], Peak], ...] = (
    (("gh200",), Peak("GH200", 989.4e12)),
    (("h200", "nvl"), Peak("H200 NVL", 835.5e12)),
    (("h200",), Peak("H200 SXM", 989.4e12)),
    (("h100", "nvl"), Peak("H100 NVL", 835.5e12)),
    (("h100", "pcie"), Peak("H100 PCIe", 756.0e12)),
    (("h100",), Peak("H100 SXM", 989.4e12)),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 ..."
    (("h800", "pcie"), Peak("H800 PCIe", 756.0e12)),
    (("h800",), Peak("H800 SXM", 989.4e12)),
    (("a100", "pcie", "40"), Peak("A100 PCIe 40GB", 312e12)),
    (("a100", "pcie"), Peak("A100 PCIe 80GB", 312e12)),
    (("a100", "40"), Peak("A100 SXM 40GB", 312e12)),
    (("a100",), Peak("A100 SXM 80GB", 312e12)),
    (("a800",), Peak("A800", 312e12)),
    (("l40s",), Peak("L40S", 362.05e12)),
    (("mi325x",), Peak("MI325X", 1307.4e12)),
    (("mi300x",), Peak("MI300X", 1307.4e12)),
    (("mi300a",), Peak("MI300A", 980.6e12)),
    (("mi250x",), Peak("MI250X (one GCD)", 191.5e12)),
    (("mi250",), Peak("MI250 (one GCD)", 181.0e12)),
)


def lookup_peak(name: str) -> Peak | None:
    """The dense bf16 peak of the device called ``name`` (as ``torch.cuda.get_device_name`` spells it), or None."""
    low = name.lower().replace("-", " ").replace("_", " ")
    for tokens, peak in PEAKS:
        if all(t in low for t in tokens):
            return peak
    return None


def peak_flops(device_or_name: torch.device | str | int | None = None) -> float | None:
    """Dense bf16 FLOP/s of a CUDA/ROCm device (a ``torch.device``, an index, a device name, or None for the
    current device); None on CPU or for a device not in :data:`PEAKS`."""
    if isinstance(device_or_name, str) and not device_or_name.startswith(("cuda", "cpu", "mps", "meta")):
        name = device_or_name
    else:
        dev = torch.device(device_or_name) if device_or_name is not None else None
        if isinstance(device_or_name, int):
            dev = torch.device("cuda", device_or_name)
        if (dev is not None and dev.type != "cuda") or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    peak = lookup_peak(name)
    return peak.flops if peak else None


def _heads(cfg: ModelConfig) -> tuple[int, int]:
    """(key/value heads, head dim), resolving the null defaults of a config that was not validated yet."""
    return cfg.n_kv_heads or cfg.n_heads, cfg.head_dim or cfg.hidden_size // cfg.n_heads


def dense_forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one layer's matmuls (qkv, attention output, SwiGLU), attention scores excluded."""
    (n_kv, d), h = _heads(cfg), cfg.hidden_size
    qkv = 2 * h * (cfg.n_heads + 2 * n_kv) * d
    attn_out = 2 * cfg.n_heads * d * h
    mlp = 2 * h * 2 * cfg.intermediate_size + 2 * cfg.intermediate_size * h
    return float(qkv + attn_out + mlp)


def head_forward_flops_per_token(cfg: ModelConfig) -> float:
    h = cfg.hidden_size
    return float(2 * h * h + 2 * h * cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, PaLM-style accounting.

    One sequence of ``seq_len`` without documents, every position labelled; attention scores count half the
    T x T matrix when causal (what a block-skipping kernel computes). :func:`batch_train_flops` counts a real batch.
    """
    scores = 2 * 2 * cfg.n_heads * _heads(cfg)[1] * seq_len * (0.5 if causal else 1.0)
    layer = dense_forward_flops_per_token(cfg) + scores
    fwd = cfg.n_layers * layer + head_forward_flops_per_token(cfg)
    return {"forward": float(fwd), "train": float(3 * fwd), "per_layer_forward": float(layer)}


def attention_pairs(mask: AttentionMask, batch: int, seq_len: int) -> int:
    """(query, key) pairs ``mask`` allows over a (batch, seq_len) self-attention, per head, exactly.

    Per (row, document) with ``c`` positions of which ``a`` lie in the bidirectional region (none for causal, all
    for bidirectional, those before ``prefix_len`` for prefix): ``a^2 + (c (c + 1) - a (a + 1)) / 2`` (a query in
    the region sees the document's ``a`` region keys; one after it the document's keys up to itself). Correct for
    any layout of document ids (pieces of one id anywhere in the row count as one document, as the mask treats
    them). Without documents the row is one document.
    """
    if mask.q_offset != 0:
        raise ValueError("attention_pairs counts self-attention (q_offset 0); decoding steps are not training FLOPs")
    pos = torch.arange(seq_len)
    if mask.kind == "causal":
        region = torch.zeros(batch, seq_len, dtype=torch.bool)
    elif mask.kind == "bidirectional":
        region = torch.ones(batch, seq_len, dtype=torch.bool)
    else:
        plen = mask.prefix_len.detach().cpu().reshape(-1).expand(batch)  # type: ignore[union-attr]
        region = pos[None, :] < plen[:, None]
    if mask.doc_ids is None:
        docs = torch.zeros(batch, seq_len, dtype=torch.long)
    else:
        docs = mask.doc_ids.detach().cpu().long()
        if docs.shape != (batch, seq_len):
            raise ValueError(f"doc_ids of shape {tuple(docs.shape)} for a batch of {batch} x {seq_len}")
    span = int(docs.max() - docs.min()) + 1 if docs.numel() else 1
    key = torch.arange(batch)[:, None] * span + (docs - docs.min())
    _, group = torch.unique(key.reshape(-1), return_inverse=True)
    c = torch.bincount(group).to(torch.int64)
    a = torch.bincount(group, weights=region.reshape(-1).double(), minlength=c.numel()).round().to(torch.int64)
    return int((a * a + (c * (c + 1) - a * (a + 1)) // 2).sum())


def batch_train_flops(
    cfg: ModelConfig, mask: AttentionMask, batch: int, seq_len: int, n_labelled: int
) -> dict[str, float]:
    """Training FLOPs (forward + backward) one micro-batch executes, by part, and their sum under ``total``.

    ``mask``: the batch's AttentionMask (MD batches carry a bidirectional one, AR a causal one, both with
    document ids); ``n_labelled``: positions with a label (the head runs there only).
    """
    tokens = batch * seq_len
    dense = 3 * cfg.n_layers * dense_forward_flops_per_token(cfg) * tokens
    attn = 3 * cfg.n_layers * 4 * _heads(cfg)[1] * cfg.n_heads * attention_pairs(mask, batch, seq_len)
    head = 3 * head_forward_flops_per_token(cfg) * n_labelled
    return {"dense": float(dense), "attention": float(attn), "head": float(head), "total": float(dense + attn + head)}


def objective_batch_flops(cfg: ModelConfig, batch: Any) -> dict[str, float]:
    """:func:`batch_train_flops` of an :class:`~megatron_dual.objectives.ObjectiveBatch` (``input_ids``,
    ``labels``, ``mask``): what the trainer calls per micro-batch."""
    b, t = batch.input_ids.shape
    n_labelled = int((batch.labels != IGNORE).sum())
    return batch_train_flops(cfg, batch.mask, b, t, n_labelled)


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """``flops / seconds / peak`` (None when the peak is unknown or the time is not positive)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / peak


def matmul_ceiling(
    device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16, size: int = 8192, iters: int = 20
) -> float:
    """Measured FLOP/s of one square ``size`` x ``size`` matmul (median of ``iters`` after warm-up): the ceiling
    MFU can also be stated against. On CPU (tests) it times with the host clock."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    times = []
    for i in range(iters + 3):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            elapsed = time.perf_counter() - t0
        if i >= 3:
            times.append(elapsed)
    times.sort()
    return 2.0 * size**3 / times[len(times) // 2]
