"""GPU-only checks (`pytest -m gpu`): run where CUDA is present; skipped elsewhere."""

import pytest
import torch

from megatron_dual.config import ModelConfig
from megatron_dual.model import AttentionMask, DualTransformer
from megatron_dual.model.loss import labelled_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_bf16_autocast_matches_fp32(kind):
    cfg = ModelConfig(n_layers=2, hidden_size=128, n_heads=2, intermediate_size=344, vocab_size=1000, max_seq_len=256)
    torch.manual_seed(0)
    model = DualTransformer(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(16, 1000, (4, 200), device="cuda")
    doc = torch.zeros_like(ids)
    doc[:, 100:] = 1
    labels = torch.randint(16, 1000, (4, 200), device="cuda")
    w = torch.ones(4, 200, device="cuda")
    mask = AttentionMask(kind, doc_ids=doc)
    ref = labelled_loss(model.head, model(ids, mask), labels, w, 1e-4).weighted / labels.numel()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = labelled_loss(model.head, model(ids, mask), labels, w, 1e-4).weighted / labels.numel()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2)
