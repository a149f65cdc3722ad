"""``model.fused_ops = apex`` and ``optimizer.adamw_impl = apex`` where apex cannot run (CPU, or apex absent): the
plain path, bit-identical, after one notice line."""

import sys

import torch

from megatron_dual.config import load_config
from megatron_dual.model import apex_ops
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.optim.muon import build_optimizers

OVR = [
    "model.n_layers=1",
    "model.hidden_size=32",
    "model.n_heads=4",
    "model.intermediate_size=48",
    "model.vocab_size=64",
    "model.max_seq_len=16",
    "data.seq_len=16",
]


def test_apex_fused_ops_falls_back_to_plain_rmsnorm_with_one_notice(capsys):
    apex_ops.notice.cache_clear()
    torch.manual_seed(0)
    plain = DualTransformer(load_config(overrides=[*OVR, "model.fused_ops=none"]).model)
    apex = DualTransformer(load_config(overrides=[*OVR, "model.fused_ops=apex"]).model)
    apex.load_state_dict(plain.state_dict())
    from megatron_dual.model.attention import AttentionMask

    ids = torch.randint(16, 64, (2, 12))
    a, b = apex(ids, AttentionMask("causal")), plain(ids, AttentionMask("causal"))
    assert torch.equal(a, b)
    err = capsys.readouterr().err
    assert err.count("model.fused_ops = apex") == 1 and "PyTorch" in err


def test_apex_adamw_without_apex_or_cuda_is_torch_adamw_with_a_notice(capsys, monkeypatch):
    apex_ops.notice.cache_clear()
    monkeypatch.setitem(sys.modules, "apex", None)  # not installed (and never the PyPI package of that name)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    model = DualTransformer(load_config(overrides=OVR).model)
    opts = build_optimizers(model, load_config(overrides=[*OVR, "optimizer.adamw_impl=apex"]).optimizer)
    assert type(opts["adamw"]) is torch.optim.AdamW
    assert "optimizer.adamw_impl = apex but NVIDIA apex is not installed" in capsys.readouterr().err
