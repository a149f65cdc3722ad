import math

import pytest
import torch

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.model import AttentionMask, DualTransformer, attention, param_counts
from megatron_dual.model.attention import reference_attention
from megatron_dual.model.loss import labelled_loss, reference_loss


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        n_layers=2, hidden_size=32, n_heads=4, intermediate_size=40, vocab_size=97, max_seq_len=64, rope_theta=10_000.0
    )
    base.update(kw)
    return ModelConfig(**base)


def randomised(cfg: ModelConfig, seed: int = 0) -> DualTransformer:
    torch.manual_seed(seed)
    model = DualTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # the reference init zeroes out/down projections; make every path matter
            p.normal_(0.0, 0.2)
    return model


def test_dual_470m_parameter_count_on_meta():
    cfg = load_config(preset="dual-470m").model
    with torch.device("meta"):
        model = DualTransformer(cfg)
    c = param_counts(model)
    per_layer = 1024 * 3 * 1024 + 1024 * 1024 + 1024 * 2 * 3554 + 3554 * 1024 + 2 * 1024
    assert c["per_layer"] == per_layer
    assert c["embedding"] == 51200 * 1024
    assert c["head"] == 1024 + 1024 * 1024 + 1024 * 51200 + 51200
    assert c["total"] == 24 * per_layer + 51200 * 1024 + c["head"] == 468_700_160  # "470M"
    assert c["non_embedding"] == 363_791_360  # "360M non-embedding" (trunk + head norm/projection)
    # No final norm in the trunk (the head's own norm is the only one after the last block); no trunk biases.
    norms = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 24 + 1 and norms[-1] == "head.norm"
    trunk_biases = [n for n, _ in model.named_parameters() if n.endswith("bias") and not n.startswith("head.")]
    assert trunk_biases == [] and model.head.out.bias is not None and model.head.proj.bias is None


def test_reference_initialisation():
    cfg = tiny_cfg(n_layers=3, hidden_size=256, n_heads=4, intermediate_size=700, vocab_size=8192, norm_eps=1e-7)
    torch.manual_seed(0)
    m = DualTransformer(cfg)
    h = cfg.hidden_size
    for i, layer in enumerate(m.layers):
        assert torch.count_nonzero(layer.attn.out.weight) == 0 and torch.count_nonzero(layer.mlp.down.weight) == 0
        assert layer.attn.qkv.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * h)) * 0.88, rel=0.05)
        expect_up = math.sqrt(2 / (5 * h)) * math.sqrt(1 / (2 * (i + 1))) * 0.88  # 0.88: truncation at 2 std
        assert layer.mlp.up.weight.std().item() == pytest.approx(expect_up, rel=0.05)
        w = layer.attn.qkv.weight
        assert w.abs().max() <= 2 * math.sqrt(2 / (5 * h)) + 1e-6
    assert m.embed.weight.std().item() == pytest.approx(math.sqrt(2 / (h + 8192)) * 0.88, rel=0.05)
    assert torch.count_nonzero(m.head.out.bias) == 0
    assert torch.all(m.layers[0].attn_norm.weight == 1)
    assert m.layers[0].attn_norm.eps == 1e-7


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_sdpa_matches_reference(kind, docs, hq, hkv):
    torch.manual_seed(1)
    b, t, d = 2, 13, 8
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 2 + [1] * 6 + [2] * 5]) if docs else None
    mask = AttentionMask(kind, doc_ids=doc_ids, prefix_len=torch.tensor([4, 7]) if kind == "prefix" else None)
    torch.testing.assert_close(attention(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_dense_prefix_mask_shape():
    m = AttentionMask("prefix", prefix_len=torch.tensor([3]))
    dense = m.dense(5, 5)[0, 0]
    assert dense[0].tolist() == [True, True, True, False, False]  # bidirectional inside the prefix
    assert dense[3].tolist() == [True, True, True, True, False]  # causal after it


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_documents_never_attend_across_boundaries(kind):
    cfg = tiny_cfg()
    model = randomised(cfg).eval()
    torch.manual_seed(2)
    ids = torch.randint(16, cfg.vocab_size, (1, 20))
    doc_ids = torch.tensor([[0] * 7 + [1] * 6 + [2] * 7])
    mask = AttentionMask(kind, doc_ids=doc_ids)
    base = model(ids, mask)
    changed = ids.clone()
    changed[0, 7:13] = torch.randint(16, cfg.vocab_size, (6,))  # rewrite document 1 only
    out = model(changed, mask)
    # Positions in documents 0 and 2 see nothing of document 1, before or after it, causal or not.
    torch.testing.assert_close(out[0, :7], base[0, :7], atol=0, rtol=0)
    torch.testing.assert_close(out[0, 13:], base[0, 13:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(out[0, 7:13], base[0, 7:13])
    if kind == "bidirectional":  # and inside a document, attention is bidirectional: early positions see later ones
        later = ids.clone()
        later[0, 12] = (ids[0, 12] + 1 - 16) % (cfg.vocab_size - 16) + 16
        assert not torch.allclose(model(later, mask)[0, 7], base[0, 7])
    else:
        later = ids.clone()
        later[0, 12] = (ids[0, 12] + 1 - 16) % (cfg.vocab_size - 16) + 16
        torch.testing.assert_close(model(later, mask)[0, 7:12], base[0, 7:12], atol=0, rtol=0)


def test_labelled_loss_matches_full_logits():
    cfg = tiny_cfg()
    model = randomised(cfg)
    torch.manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    labels = torch.randint(0, cfg.vocab_size, (2, 11))
    labels[0, :4] = -100
    labels[1, 7:] = -100
    weights = torch.rand(2, 11) + 0.5
    mask = AttentionMask("causal")
    hidden = model(ids, mask)
    got = labelled_loss(model.head, hidden, labels, weights, z_loss=1e-4, chunk_size=5)
    ref = reference_loss(model.head(hidden), labels, weights, z_loss=1e-4)
    torch.testing.assert_close(got.weighted, ref, atol=1e-4, rtol=1e-5)
    assert got.count == int((labels != -100).sum())
    g1 = torch.autograd.grad(got.weighted, model.head.out.weight)[0]
    g2 = torch.autograd.grad(
        reference_loss(model.head(model(ids, mask)), labels, weights, 1e-4), model.head.out.weight
    )[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_gqa_model_runs_and_positions_checked():
    cfg = tiny_cfg(n_kv_heads=2)
    model = randomised(cfg)
    out = model.logits(torch.randint(0, 97, (2, 9)), AttentionMask("causal"))
    assert out.shape == (2, 9, 97)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long), AttentionMask("causal"))
