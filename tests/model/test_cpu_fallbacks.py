"""Backends asked for by name that cannot run a CPU training call fall back with one notice line instead of a
traceback: ``model.attention_backend = flex`` (FlexAttention has no CPU backward)."""

from __future__ import annotations

import pytest
import torch

from megatron_dual.model.attention import AttentionMask, attention


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
