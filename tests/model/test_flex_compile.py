"""FlexAttention compiles once per call signature, past Dynamo's per-code-object recompile limit, and never again.

A single ``torch.compile(flex_attention)`` shares one Dynamo cache across masks and shapes: the ninth distinct call
recompiles past the limit and silently runs eagerly. ``attention.flex_compiled`` gives each signature a code object
of its own. Checked on CPU with a counting Dynamo backend (no inductor build), against the reference attention.
"""

from __future__ import annotations

import pytest
import torch

A = pytest.importorskip("megatron_dual.model.attention")
flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def counting(monkeypatch):
    graphs: list[int] = []

    def backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    monkeypatch.setattr(A, "_FLEX_COMPILED", {})
    monkeypatch.setitem(A.FLEX_COMPILE_OPTIONS, "backend", backend)
    return graphs


def _mask(kind: str, b: int, t: int, seed: int) -> A.AttentionMask:
    g = torch.Generator().manual_seed(seed)
    docs = torch.sort(torch.randint(0, 3, (b, t), generator=g), dim=1).values
    if kind == "prefix":
        return A.AttentionMask("prefix", doc_ids=docs, prefix_len=torch.randint(1, t, (b,), generator=g))
    return A.AttentionMask(kind, doc_ids=docs)


def _run(mask: A.AttentionMask, b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 2, t, 16, generator=g) for _ in range(3))
    block_mask = flex.create_block_mask(A._flex_mask_mod(mask, q.device), b, None, t, t, device="cpu")
    fn = A.flex_compiled(A.flex_signature(q, k, mask))
    return fn(q, k, v, block_mask, False), A.reference_attention(q, k, v, mask)


def test_each_signature_compiles_once_beyond_the_recompile_limit(counting):
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    shapes = ((1, 128), (2, 128), (1, 256))
    signatures = [(kind, b, t) for kind in ("causal", "bidirectional", "prefix") for b, t in shapes]
    assert len(signatures) > limit  # one shared compiled function would have fallen back to eager here
    for i, (kind, b, t) in enumerate(signatures):
        out, ref = _run(_mask(kind, b, t, i), b, t, i)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(counting) == len(signatures) == len(A._FLEX_COMPILED)
    with torch.compiler.set_stance("fail_on_recompile"):  # new document ids and prefixes: the same graphs
        for i, (kind, b, t) in enumerate(signatures):
            out, ref = _run(_mask(kind, b, t, 100 + i), b, t, 100 + i)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(counting) == len(signatures)


def test_signature_ignores_mask_values_but_not_structure():
    q = torch.randn(2, 2, 64, 16)
    a, b = _mask("causal", 2, 64, 0), _mask("causal", 2, 64, 1)
    assert A.flex_signature(q, q, a) == A.flex_signature(q, q, b)
    assert A.flex_signature(q, q, a) != A.flex_signature(q, q, A.AttentionMask("causal"))
    assert A.flex_signature(q, q, a) != A.flex_signature(q.half(), q.half(), a)
