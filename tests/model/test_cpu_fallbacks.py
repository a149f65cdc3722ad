"""Backends asked for by name that cannot run a CPU training call fall back with one notice line instead of a
traceback: ``model.attention_backend = flex`` (FlexAttention has no CPU backward) and ``model.fused_ops = triton``
(the kernels need a GPU unless ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from megatron_dual.config import load_config
from megatron_dual.model import apex_ops
from megatron_dual.model.attention import AttentionMask, attention
from megatron_dual.model.transformer import DualTransformer

OVR = [
    "model.n_layers=1",
    "model.hidden_size=32",
    "model.n_heads=2",
    "model.intermediate_size=48",
    "model.vocab_size=64",
    "model.max_seq_len=16",
    "data.seq_len=16",
]


def test_flex_on_cpu_with_gradients_falls_back_to_sdpa(capsys, caplog):
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = AttentionMask("causal")
    out = attention(q, k, v, mask, "flex")  # NotImplementedError: FlexAttention does not support backward on CPU
    out.sum().backward()
    assert torch.equal(out, attention(q, k, v, mask, "sdpa"))
    said = capsys.readouterr().err + caplog.text  # a print, or a log record where logging is set up
    assert "FlexAttention has no backward on CPU); falling back to sdpa" in said
    # without gradients (evaluation, generation) FlexAttention runs eagerly on CPU, as before
    flex_out = attention(q.detach(), k.detach(), v.detach(), mask, "flex")
    torch.testing.assert_close(flex_out, out.detach(), rtol=1e-5, atol=1e-5)


def test_fused_ops_triton_on_cpu_runs_pytorch_ops_after_one_notice(capsys, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    apex_ops.notice.cache_clear()
    torch.manual_seed(0)
    fused = DualTransformer(load_config(preset="tiny", overrides=[*OVR, "model.fused_ops=triton"]).model)
    plain = DualTransformer(load_config(preset="tiny", overrides=[*OVR, "model.fused_ops=none"]).model)
    plain.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    out = fused(tokens, AttentionMask("causal"))  # RuntimeError: 0 active drivers ([]). There should only be one.
    assert torch.equal(out, plain(tokens, AttentionMask("causal")))
    assert capsys.readouterr().err.count("model.fused_ops = triton on a cpu tensor") == 1
