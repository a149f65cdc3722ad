"""Honest MFU: attention pairs per mask against a dense count, batch FLOPs, peaks by exact device name."""

from __future__ import annotations

import pytest
import torch

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.model import flops as F
from megatron_dual.model.attention import AttentionMask
from megatron_dual.objectives import ar_batch, md_batch


def _dense_pairs(mask: AttentionMask, b: int, t: int) -> int:
    dense = mask.dense(t, t)
    return b * t * t if dense is None else int(dense.expand(b, 1, t, t).sum())


def _docs(b: int, t: int, g: torch.Generator, contiguous: bool) -> torch.Tensor:
    if contiguous:
        return torch.sort(torch.randint(0, 5, (b, t), generator=g), dim=1).values
    return torch.randint(0, 4, (b, t), generator=g)  # pieces of one id anywhere in the row


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
@pytest.mark.parametrize("docs", ["none", "runs", "scattered"])
def test_attention_pairs_equal_dense_count(kind, docs):
    g = torch.Generator().manual_seed(sum(map(ord, kind + docs)))
    for b, t in ((1, 1), (3, 17), (2, 64)):
        doc_ids = None if docs == "none" else _docs(b, t, g, docs == "runs") + 7
        plen = torch.randint(0, t + 1, (b,), generator=g) if kind == "prefix" else None
        mask = AttentionMask(kind, doc_ids=doc_ids, prefix_len=plen)
        assert F.attention_pairs(mask, b, t) == _dense_pairs(mask, b, t)


def test_closed_forms_and_refusals():
    t = 2048
    assert F.attention_pairs(AttentionMask("causal"), 1, t) == t * (t + 1) // 2
    assert F.attention_pairs(AttentionMask("bidirectional"), 2, t) == 2 * t * t
    docs = torch.tensor([[0] * 1000 + [1] * 1048])
    assert F.attention_pairs(AttentionMask("bidirectional", doc_ids=docs), 1, t) == 1000**2 + 1048**2
    with pytest.raises(ValueError, match="q_offset"):
        F.attention_pairs(AttentionMask("causal", q_offset=3), 1, 4)
    with pytest.raises(ValueError, match="doc_ids of shape"):
        F.attention_pairs(AttentionMask("causal", doc_ids=torch.zeros(1, 5)), 1, 4)


def test_batch_flops_match_per_token_estimate_and_count_md_as_bidirectional():
    cfg = load_config(preset="dual-470m").model
    b, t = 2, 256
    full = F.batch_train_flops(cfg, AttentionMask("bidirectional"), b, t, n_labelled=b * t)
    assert full["total"] == pytest.approx(F.flops_per_token(cfg, t, causal=False)["train"] * b * t, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(16, cfg.vocab_size, (b, t + 1), generator=g)
    doc_ids = torch.zeros(b, t + 1, dtype=torch.long)
    doc_ids[:, 100:] = 1
    ar = F.objective_batch_flops(cfg, ar_batch(tokens, doc_ids))
    md = F.objective_batch_flops(cfg, md_batch(tokens, doc_ids, g, mask_token_id=4, n_special=16, t_min=0.3))
    assert ar["dense"] == md["dense"] == full["dense"]
    pairs_ar = b * (100 * 101 // 2 + 156 * 157 // 2)
    pairs_md = b * (100**2 + 156**2)
    per_pair = 3 * cfg.n_layers * 4 * cfg.head_dim * cfg.n_heads
    assert ar["attention"] == per_pair * pairs_ar and md["attention"] == per_pair * pairs_md
    head = 3 * F.head_forward_flops_per_token(cfg)
    assert ar["head"] == head * (b * t - b)  # every position but the one before the document boundary
    assert 0 < md["head"] < ar["head"]  # MD labels the masked positions only
    assert ar["total"] == ar["dense"] + ar["attention"] + ar["head"]


@pytest.mark.parametrize(
    "name,label",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"),
        ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
        ("AMD Instinct MI250X", "MI250X (one GCD)"),
        ("AMD Instinct MI300X", "MI300X"),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peaks_by_exact_device_name(name, label):
    peak = F.lookup_peak(name)
    assert (peak.label if peak else None) == label
    assert F.peak_flops(name) == (peak.flops if peak else None)


def test_peak_values_and_cpu():
    assert F.peak_flops("NVIDIA H100 PCIe") == 756e12 < F.peak_flops("NVIDIA H100 NVL") < F.peak_flops("NVIDIA H200")
    assert F.peak_flops(torch.device("cpu")) is None and F.peak_flops("cpu") is None
    assert F.mfu(1e12, 2.0, 1e12) == 0.5 and F.mfu(1.0, 1.0, None) is None


def test_matmul_ceiling_measures_on_cpu_and_flops_per_token_is_reexported():
    from megatron_dual.model.transformer import flops_per_token

    assert flops_per_token is F.flops_per_token
    assert F.matmul_ceiling("cpu", torch.float32, size=64, iters=3) > 0
    cfg = ModelConfig(intermediate_size=3554, pad_intermediate_to=64)  # model FLOPs at the logical width
    assert F.dense_forward_flops_per_token(cfg) == F.dense_forward_flops_per_token(ModelConfig())
