"""Triton flash attention against the fp32 reference, and the backend choice.

Without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before the kernel module
is imported (triton decides at decoration time); ``tests/conftest.py`` sets it for the whole suite. Other modules'
behaviour does not depend on the variable (``auto`` never picks Triton on CPU). With CUDA the same tests run the
compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

import pytest  # noqa: E402
import torch

import megatron_dual.kernels.attention as K  # noqa: E402
from megatron_dual.config import ModelConfig  # noqa: E402
from megatron_dual.model.attention import AttentionMask, attention, reference_attention  # noqa: E402

A = importlib.import_module("megatron_dual.model.attention")  # the package re-exports the function `attention`

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def runs(lengths: list[int], first_id: int = 0) -> torch.Tensor:
    return torch.cat([torch.full((n,), first_id + i) for i, n in enumerate(lengths)])


def check(
    b: int,
    hq: int,
    hkv: int,
    tq: int,
    d: int,
    mask: AttentionMask,
    dtype: torch.dtype = torch.float32,
    tk: int | None = None,
    seed: int = 0,
) -> None:
    """Kernel output and dq, dk, dv against reference_attention in fp32 on the upcast inputs."""
    tk = tk or tq
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(b, hkv, tk, d, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(b, hkv, tk, d, generator=g).to(DEVICE, dtype).requires_grad_()
    do = torch.randn(b, hq, tq, d, generator=g).to(DEVICE, dtype)
    docs = mask.doc_ids.to(DEVICE) if mask.doc_ids is not None else None
    plen = mask.prefix_len.to(DEVICE) if mask.prefix_len is not None else None
    out = K.flash_attention(q, k, v, mask.kind, doc_ids=docs, prefix_len=plen, q_offset=mask.q_offset)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_mask = AttentionMask(mask.kind, doc_ids=docs, prefix_len=plen, q_offset=mask.q_offset)
    ref = reference_attention(*ref_in, ref_mask)
    ref_grads = torch.autograd.grad(ref, ref_in, do.float())
    assert out.dtype == dtype and out.shape == (b, hq, tq, d)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want, **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")


# ------------------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize(
    "b, hq, hkv, t, kind",
    [(1, 2, 2, 1, "causal"), (2, 4, 2, 17, "causal"), (3, 2, 1, 130, "bidirectional"), (1, 2, 2, 257, "causal")],
)
def test_plain_masks(b, hq, hkv, t, kind):
    check(b, hq, hkv, t, 16, AttentionMask(kind))


def test_documents_causal_gqa():
    docs = torch.stack([runs([40, 3, 87]), runs([1, 128, 1], first_id=7)])
    check(2, 4, 2, 130, 16, AttentionMask("causal", doc_ids=docs))


def test_documents_bidirectional_uneven():
    docs = torch.stack([runs([5, 60, 33, 32]), runs([130])])
    check(2, 2, 2, 130, 16, AttentionMask("bidirectional", doc_ids=docs))


def test_documents_that_come_back():
    # id 0 reappears after id 1: tile skipping must still see both pieces of document 0
    docs = torch.cat([runs([20]), runs([30], first_id=1), runs([20]), runs([10], first_id=2)])[None]
    check(1, 2, 1, 80, 16, AttentionMask("bidirectional", doc_ids=docs))


def test_prefix_lengths_0_1_and_full():
    check(3, 2, 2, 67, 16, AttentionMask("prefix", prefix_len=torch.tensor([0, 1, 67])))


def test_prefix_with_documents():
    docs = torch.stack([runs([50, 80]), runs([17, 100, 13])])
    check(2, 2, 1, 130, 16, AttentionMask("prefix", doc_ids=docs, prefix_len=torch.tensor([40, 70])))


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(d):
    docs = runs([10, 23])[None]
    check(1, 2, 1, 33, d, AttentionMask("causal", doc_ids=docs))


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_fp16(kind):
    docs = torch.stack([runs([70, 60]), runs([2, 128])])
    check(2, 2, 1, 130, 32, AttentionMask(kind, doc_ids=docs), dtype=torch.float16)


def test_kv_cache_offset():
    # 5 new queries at positions 35..39 over 40 cached keys in two documents, prefix 12 (Tq != Tk)
    docs = torch.stack([runs([12, 28]), runs([38, 2])])
    check(2, 2, 2, 5, 16, AttentionMask("prefix", doc_ids=docs, prefix_len=torch.tensor([12, 3]), q_offset=35), tk=40)
    check(1, 2, 1, 7, 16, AttentionMask("causal", q_offset=30), tk=37)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
@pytest.mark.parametrize("t", [1, 17, 130, 257])
def test_sweep(kind, t):
    docs = torch.stack([runs([t // 3, t - t // 3]), runs([t])])
    plen = torch.tensor([t // 2, 1])
    check(2, 2, 1, t, 32, AttentionMask(kind, doc_ids=docs, prefix_len=plen if kind == "prefix" else None))


def test_document_spans_match_brute_force():
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(0, 4, (3, 29), generator=g)
    lo, hi = K.document_spans(docs)
    for b in range(3):
        for t in range(29):
            where = (docs[b] == docs[b, t]).nonzero().flatten()
            assert (lo[b, t], hi[b, t]) == (where.min(), where.max() + 1)


def test_run_bounds_match_brute_force():
    g = torch.Generator().manual_seed(2)
    docs = torch.randint(0, 3, (3, 23), generator=g)
    docs[0] = 4  # one run over the whole row
    lo, hi = K.run_bounds(docs)
    for b in range(3):
        for t in range(23):
            a, e = t, t + 1
            while a > 0 and docs[b, a - 1] == docs[b, t]:
                a -= 1
            while e < 23 and docs[b, e] == docs[b, t]:
                e += 1
            assert (lo[b, t], hi[b, t]) == (a, e)


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_documents_on_tile_boundaries(kind):
    # runs that start and end exactly on 16- and 32-wide tile edges, next to ones that do not (interpreter tiles:
    # 32 x 16 forward and dq, 16 x 32 dk/dv), so every tile class (inside, straddling, edge-aligned) occurs
    docs = torch.stack([runs([32, 48, 16, 3]), runs([64, 1, 34])])
    plen = torch.tensor([40, 65]) if kind == "prefix" else None
    check(2, 2, 1, 99, 16, AttentionMask(kind, doc_ids=docs, prefix_len=plen))


def test_tiles_inside_a_run_skip_the_document_compare():
    """The kernels trust the run bounds: claiming one run over two documents must change the result, so the fast
    tiles (no element-wise document compare) are really taken; the true bounds give the reference."""
    docs = runs([40, 56])[None]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g).to(DEVICE) for _ in range(3))
    mask = AttentionMask("bidirectional", doc_ids=docs.to(DEVICE))
    tiles = K.document_tiles(docs.to(DEVICE))
    good = K.flash_attention(q, k, v, "bidirectional", doc_ids=docs.to(DEVICE), doc_spans=tiles)
    torch.testing.assert_close(good, reference_attention(q, k, v, mask), **TOL[torch.float32])
    spans_only = K.flash_attention(q, k, v, "bidirectional", doc_ids=docs.to(DEVICE), doc_spans=tiles[:2])
    torch.testing.assert_close(spans_only, good, atol=0, rtol=0)  # the older 2-tuple form: runs derived inside
    one_run = (torch.zeros_like(tiles[2]), torch.full_like(tiles[3], 96))
    bad = K.flash_attention(q, k, v, "bidirectional", doc_ids=docs.to(DEVICE), doc_spans=(*tiles[:2], *one_run))
    assert not torch.allclose(bad, good, atol=1e-3)


@pytest.mark.parametrize("docs", [False, True])
def test_ragged_last_key_tile_under_very_negative_scores(docs):
    """A query whose every score is about -100 has a base-2 log-sum-exp below -126; the zero keys past T in the
    ragged last key tile must then be cut by the bound, not only by the document compare (which tiles inside one
    document skip), or exp2(-lse) overflows and dq is NaN. Bidirectional, T = 20: not a multiple of any tile."""
    t, d = 20, 16
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, t, d, generator=g) for _ in range(4))
    q[0, 0, 0] = 0.0
    q[0, 0, 0, 0] = 20.0
    k[0, 0, :, 0] = -20.0  # query 0: every score about -100
    ids = torch.zeros(1, t, dtype=torch.long) if docs else None
    q, k, v = (x.to(DEVICE).requires_grad_() for x in (q, k, v))
    out = K.flash_attention(q, k, v, "bidirectional", doc_ids=None if ids is None else ids.to(DEVICE))
    grads = torch.autograd.grad(out, (q, k, v), do.to(DEVICE))
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, AttentionMask("bidirectional", doc_ids=ids))
    for got, want in zip(grads, torch.autograd.grad(ref, ref_in, do.to(DEVICE)), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_diagonal_tiles_inside_a_run_skip_the_document_compare():
    """The positional (diagonal) tiles trust the run bounds too. Documents [0, 32), [32, 50), [50, 64), [64, 96)
    under a causal mask: with the interpreter's 32-query tiles every key tile a query tile visits is positional
    (the true document spans start its key range at its own first position), and the only boundary inside a
    visited tile is 50. Claiming one run must then change the result, through those tiles alone."""
    docs = runs([32, 18, 14, 32])[None].to(DEVICE)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g).to(DEVICE) for _ in range(3))
    tiles = K.document_tiles(docs)
    good = K.flash_attention(q, k, v, "causal", doc_ids=docs, doc_spans=tiles)
    ref = reference_attention(q, k, v, AttentionMask("causal", doc_ids=docs))
    torch.testing.assert_close(good, ref, **TOL[torch.float32])
    one_run = (torch.zeros_like(tiles[2]), torch.full_like(tiles[3], 96))
    bad = K.flash_attention(q, k, v, "causal", doc_ids=docs, doc_spans=(*tiles[:2], *one_run))
    assert not torch.allclose(bad, good, atol=1e-3)


def test_output_is_laid_out_bthd():
    """The output is a (B, H, T, D) view of (B, T, H, D) memory, so the model's reshape to (B, T, H * D) is a view."""
    q = torch.randn(2, 4, 19, 16, device=DEVICE)
    kv = torch.randn(2, 2, 19, 16, device=DEVICE)
    out = K.flash_attention(q, kv, kv, "causal")
    flat = out.transpose(1, 2).reshape(2, 19, 64)
    assert out.shape == (2, 4, 19, 16) and flat.data_ptr() == out.data_ptr() and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, reference_attention(q, kv, kv, AttentionMask("causal")), **TOL[torch.float32])


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_tma_descriptors(monkeypatch, kind):
    """MEGATRON_DUAL_ATTN_TMA=1: the forward and dQ kernels load k and v, the dK/dV kernel q and dO, through tensor
    descriptors (the interpreter emulates them); ragged last tiles come back zero-filled, as the masked loads do."""
    monkeypatch.setattr(K, "TMA", True)
    k = torch.zeros(1, 2, 8, 16, device=DEVICE)
    assert K._use_tma(k, k) == hasattr(K.tl, "make_tensor_descriptor")
    shifted = k.flatten()[1:129].view(1, 2, 4, 16)  # a base 4 bytes off 16-byte alignment
    assert not K._use_tma(shifted, shifted)
    docs = torch.stack([runs([20, 17]), runs([5, 32])])
    check(
        2,
        4,
        2,
        37,
        16,
        AttentionMask(kind, doc_ids=docs, prefix_len=torch.tensor([9, 30]) if kind == "prefix" else None),
    )


def test_kernel_input_errors():
    q = torch.zeros(1, 3, 8, 16, device=DEVICE)
    kv = torch.zeros(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        K.flash_attention(q, kv, kv)
    q = torch.zeros(1, 2, 8, 24, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 24"):
        K.flash_attention(q, q, q)
    with pytest.raises(ValueError, match="prefix_len"):
        x = torch.zeros(1, 1, 8, 16, device=DEVICE)
        K.flash_attention(x, x, x, "prefix")


def check_qkv(b: int, hq: int, hkv: int, t: int, d: int, mask: AttentionMask, dtype: torch.dtype) -> None:
    """flash_attention_qkv (rotary in place + attention, packed gradient) against rope.apply_rotary followed by
    reference_attention in fp32: the output (B, T, Hq * D) and the gradient of the projection's output."""
    from megatron_dual.model.rope import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(7)
    base = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(b, t, hq * d, generator=g).to(DEVICE, dtype)
    cos, sin = RotaryEmbedding(d, max(t, 64), 10_000.0).cos_sin(torch.arange(t))
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    docs = mask.doc_ids.to(DEVICE) if mask.doc_ids is not None else None
    plen = mask.prefix_len.to(DEVICE) if mask.prefix_len is not None else None
    qkv = base * 1  # a non-leaf, like the projection's output (rotated in place)
    y = K.flash_attention_qkv(qkv, cos, sin, hq, hkv, mask.kind, doc_ids=docs, prefix_len=plen)
    (grad,) = torch.autograd.grad(y, base, dy)
    ref_base = base.detach().float().requires_grad_()
    q, k, v = ref_base.view(b, t, hq + 2 * hkv, d).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    ref_mask = AttentionMask(mask.kind, doc_ids=docs, prefix_len=plen)
    ref = reference_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, ref_mask)
    ref = ref.transpose(1, 2).reshape(b, t, hq * d)
    (ref_grad,) = torch.autograd.grad(ref, ref_base, dy.float())
    assert y.shape == ref.shape and y.dtype == dtype and grad.dtype == dtype
    assert y.is_contiguous() and grad.is_contiguous()
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    torch.testing.assert_close(grad.float(), ref_grad, **TOL[dtype])


def test_packed_qkv_causal_documents_gqa():
    check_qkv(
        2, 4, 2, 37, 16, AttentionMask("causal", doc_ids=torch.stack([runs([20, 17]), runs([37])])), torch.float32
    )


def test_packed_qkv_prefix_documents_fp16():
    docs = torch.stack([runs([9, 28]), runs([30, 7])])
    mask = AttentionMask("prefix", doc_ids=docs, prefix_len=torch.tensor([5, 21]))
    check_qkv(2, 2, 1, 37, 32, mask, torch.float16)


def test_packed_qkv_bidirectional():
    check_qkv(1, 2, 2, 21, 16, AttentionMask("bidirectional"), torch.float32)


def test_packed_qkv_from_a_view():
    """A qkv that autograd tracks as a view (a biased projection's 3-D output, a slice of a wider buffer) works
    with gradients on (copied first: a view cannot be marked dirty in a two-output function) and equals the
    reference, for the gradients of the projection's input, weight and bias."""
    from megatron_dual.model.rope import RotaryEmbedding, apply_rotary

    b, t, hq, hkv, d = 2, 19, 2, 1, 16
    g = torch.Generator().manual_seed(4)
    x, w, bias = (torch.randn(s, generator=g).to(DEVICE).requires_grad_() for s in ((b, t, 24), (64, 24), (64,)))
    dy = torch.randn(b, t, hq * d, generator=g).to(DEVICE)
    cos, sin = (c.to(DEVICE) for c in RotaryEmbedding(d, 32, 10_000.0).cos_sin(torch.arange(t)))
    mask = AttentionMask("causal", doc_ids=torch.stack([runs([7, 12]), runs([19])]).to(DEVICE))
    qkv = torch.nn.functional.linear(x, w, bias)
    wide = torch.nn.functional.linear(x, torch.cat([w, w[:16]]))[..., :64]  # a slice of a wider projection
    assert qkv._is_view() and wide._is_view()
    outs = [K.flash_attention_qkv(t_, cos, sin, hq, hkv, "causal", doc_ids=mask.doc_ids) for t_ in (qkv, wide)]
    grads = torch.autograd.grad(outs[0], (x, w, bias), dy)
    ref_qkv = torch.nn.functional.linear(x, w, bias)
    q, k, v = ref_qkv.view(b, t, hq + 2 * hkv, d).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    ref = reference_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, mask)
    ref = ref.transpose(1, 2).reshape(b, t, hq * d)
    torch.testing.assert_close(outs[0], ref, **TOL[torch.float32])
    plain = torch.nn.functional.linear(x, w)  # no bias: not a view, the model's case
    assert not plain._is_view()
    same = K.flash_attention_qkv(plain, cos, sin, hq, hkv, "causal", doc_ids=mask.doc_ids)
    torch.testing.assert_close(outs[1], same, atol=0, rtol=0)
    for got, want in zip(grads, torch.autograd.grad(ref, (x, w, bias), dy), strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_double_backward_is_an_error():
    """The kernels' backward is not itself differentiable: a second-order gradient through them raises instead of
    silently contributing zero (plain and packed functions)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    (dq,) = torch.autograd.grad(K.flash_attention(q, k, v, "causal").square().sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dq.sum().backward()
    qkv = torch.randn(1, 9, 4 * 16, generator=g).to(DEVICE).requires_grad_()
    cos, sin = torch.ones(9, 16, device=DEVICE), torch.zeros(9, 16, device=DEVICE)
    out = K.flash_attention_qkv(qkv.clone(), cos, sin, 2, 1, "bidirectional")
    (dqkv,) = torch.autograd.grad(out.square().sum(), (qkv,), create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        dqkv.sum().backward()


# ---------------------------------------------------------------------------------------------- backends

CAPS_ALL = A.Capabilities(triton=True, flash=True, flex=True, interpret=False)
CAPS_NONE = A.Capabilities(triton=False, flash=False, flex=False, interpret=False)


def pick(requested, mask, device="cuda", dtype=torch.bfloat16, d=64, tq=128, tk=128, caps=CAPS_ALL):
    return A.select_backend(requested, device=device, dtype=dtype, head_dim=d, mask=mask, q_len=tq, k_len=tk, caps=caps)


def test_auto_selection():
    docs = torch.zeros(2, 128, dtype=torch.long)
    assert pick("auto", AttentionMask("causal"))[0] == "flash"
    assert pick("auto", AttentionMask("bidirectional", doc_ids=docs))[0] == "flash"
    name, why = pick("auto", AttentionMask("prefix", prefix_len=torch.tensor([3, 4])))
    assert name == "triton" and "prefix" in why
    assert pick("auto", AttentionMask("causal"), dtype=torch.float32)[0] == "triton"
    assert pick("auto", AttentionMask("causal"), d=96)[0] == "flash"  # flash-attn takes 96, Triton would not
    assert pick("auto", AttentionMask("prefix", prefix_len=torch.tensor([1])), d=96)[0] == "sdpa"
    assert pick("auto", AttentionMask("causal"), caps=CAPS_NONE)[0] == "sdpa"
    caps = A.Capabilities(triton=True, flash=False, flex=True, interpret=False)
    assert pick("auto", AttentionMask("causal"), caps=caps)[0] == "triton"
    # on CPU auto is SDPA, even with the interpreter on and everything installed
    assert pick("auto", AttentionMask("causal"), device="cpu", caps=A.Capabilities(True, True, True, True))[0] == "sdpa"


def test_explicit_backends_fall_back_with_a_reason():
    prefix = AttentionMask("prefix", prefix_len=torch.tensor([5]))
    name, why = pick("flash", prefix)
    assert name == "triton" and "no prefix-LM mask" in why and "falling back" in why
    name, why = pick("flash", prefix, dtype=torch.float32, d=96)
    assert name == "sdpa"
    name, why = pick("triton", AttentionMask("causal"), device="cpu")
    assert name == "sdpa" and "TRITON_INTERPRET" in why
    assert (
        pick("triton", AttentionMask("causal"), device="cpu", caps=A.Capabilities(True, False, False, True))[0]
        == "triton"
    )
    assert pick("flex", AttentionMask("causal"), caps=CAPS_NONE)[0] == "sdpa"
    assert pick("flex", prefix)[0] == "flex"
    assert pick("sdpa", prefix, caps=CAPS_NONE) == ("sdpa", "attention backend sdpa on cuda")
    # KV-cache decoding: flash-attn aligns causal masks to the last key; documents need Tq == Tk
    assert pick("flash", AttentionMask("causal", q_offset=120), tq=8, tk=128)[0] == "flash"
    assert pick("flash", AttentionMask("causal", q_offset=0), tq=8, tk=128)[0] == "triton"
    docs = torch.zeros(1, 128, dtype=torch.long)
    assert pick("flash", AttentionMask("causal", doc_ids=docs, q_offset=120), tq=8, tk=128)[0] == "triton"
    with pytest.raises(ValueError, match="choose one of"):
        pick("xformers", AttentionMask("causal"))


def test_config_accepts_the_backends():
    from megatron_dual.config import Config, ConfigError

    for name in A.BACKENDS:
        Config(model=ModelConfig(attention_backend=name)).validate()
    with pytest.raises(ConfigError, match="attention_backend"):
        Config(model=ModelConfig(attention_backend="flash2")).validate()


def test_fallback_notice_is_printed_once(capsys, monkeypatch):
    monkeypatch.setattr(A, "_said", set())
    monkeypatch.setattr(A, "capabilities", lambda: CAPS_NONE)
    monkeypatch.setattr(A.logging.getLogger(), "handlers", [])
    q = torch.randn(1, 2, 9, 16)
    mask = AttentionMask("causal")
    for _ in range(3):
        out = attention(q, q, q, mask, backend="triton")
    torch.testing.assert_close(out, reference_attention(q, q, q, mask))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "megatron-dual: attention backend triton cannot run this call (triton is not installed); falling back to sdpa"
    ]


def test_document_runs():
    docs = torch.stack([runs([3, 2]), runs([1, 4], first_id=5)])
    cu, longest = A.document_runs(docs)
    assert cu.tolist() == [0, 3, 5, 6, 10] and longest == 4
    assert A.document_runs(torch.tensor([[0, 0, 1, 0]])) is None


def fake_flash_attn() -> types.ModuleType:
    """flash-attn's two entry points written with SDPA: checks our (B, T, H, D) layouts and cu_seqlens wiring."""
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
        return o.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert torch.equal(cu_q, cu_k) and q.dim() == 3
        pieces = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            assert e - s <= max_q
            pieces.append(flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal=causal)[0])
        return torch.cat(pieces)

    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_flash_wiring_with_documents(monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    docs = torch.stack([runs([3, 9, 8]), runs([20], first_id=4)])
    q, k, v = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    for mask in (AttentionMask(kind, doc_ids=docs), AttentionMask(kind)):
        torch.testing.assert_close(A._flash(q, k, v, mask), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert A._flash(q, k, v, AttentionMask(kind, doc_ids=torch.tensor([[0] * 5 + [1] * 10 + [0] * 5] * 2))) is None


@pytest.mark.parametrize("kind", ["causal", "prefix"])
def test_flex_backend_on_cpu(kind):
    pytest.importorskip("torch.nn.attention.flex_attention")
    docs = torch.stack([runs([10, 14]), runs([3, 21])])
    mask = AttentionMask(kind, doc_ids=docs, prefix_len=torch.tensor([12, 2]) if kind == "prefix" else None)
    q, k, v = torch.randn(2, 4, 24, 16), torch.randn(2, 2, 24, 16), torch.randn(2, 2, 24, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns that it is the slow debugging path
        got = A._flex(q, k, v, mask)
    torch.testing.assert_close(got, reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ a training step end to end


@pytest.mark.parametrize("fused_ops", ["auto", "triton"])
def test_tiny_model_step_triton_matches_sdpa(monkeypatch, fused_ops):
    """A loss and its gradients: Triton attention (with fused_ops=triton: rotary + attention on the packed qkv)
    against SDPA with the unfused ops."""
    from megatron_dual.model import DualTransformer
    from megatron_dual.model.loss import labelled_loss

    packed_calls = []
    packed = K.flash_attention_qkv
    monkeypatch.setattr(K, "flash_attention_qkv", lambda *a, **kw: packed_calls.append(1) or packed(*a, **kw))

    def build(backend: str, fused: str) -> DualTransformer:
        cfg = ModelConfig(
            n_layers=2,
            hidden_size=64,
            n_heads=4,
            n_kv_heads=2,
            intermediate_size=96,
            vocab_size=101,
            max_seq_len=64,
            rope_theta=10_000.0,
            attention_backend=backend,
            fused_ops=fused,
        )
        torch.manual_seed(0)
        model = DualTransformer(cfg).to(DEVICE)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        return model

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(16, 101, (2, 41), generator=g).to(DEVICE)
    labels = torch.randint(16, 101, (2, 41), generator=g).to(DEVICE)
    weights = torch.rand(2, 41, generator=g).to(DEVICE)
    docs = torch.stack([runs([13, 28]), runs([41])]).to(DEVICE)
    masks = [
        AttentionMask("causal", doc_ids=docs),
        AttentionMask("bidirectional", doc_ids=docs),
        AttentionMask("prefix", doc_ids=docs, prefix_len=torch.tensor([5, 20], device=DEVICE)),
    ]
    if fused_ops == "triton":  # the interpreter runs every fused kernel: one mask, the most involved one
        masks = masks[2:]
    for mask in masks:
        results = []
        for backend, fused in (("sdpa", "none"), ("triton", fused_ops)):
            model = build(backend, fused)
            loss = labelled_loss(model.head, model(ids, mask), labels, weights, 1e-4).weighted / labels.numel()
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (ref_loss, ref_grads), (loss, grads) = results
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    # the packed path runs exactly when the fused ops do (on CPU "auto" means PyTorch ops): once per layer and mask
    assert len(packed_calls) == (2 * len(masks) if fused_ops == "triton" or DEVICE == "cuda" else 0)


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "prefix"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16(kind, d, docs):
    t = 1000
    doc_ids = torch.stack([runs([300, 1, 499, 200]), runs([t])]) if docs else None
    plen = torch.tensor([77, 500]) if kind == "prefix" else None
    check(2, 8, 2, t, d, AttentionMask(kind, doc_ids=doc_ids, prefix_len=plen), dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["causal", "prefix"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_qkv_bf16(kind):
    docs = torch.stack([runs([300, 1, 499, 200]), runs([1000])])
    plen = torch.tensor([77, 500]) if kind == "prefix" else None
    check_qkv(2, 8, 2, 1000, 64, AttentionMask(kind, doc_ids=docs, prefix_len=plen), torch.bfloat16)


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tma_bf16(monkeypatch, kind):
    if K.device_arch(torch.device("cuda")) != "sm90" or not hasattr(K.tl, "make_tensor_descriptor"):
        pytest.skip("TMA descriptors: sm90 and a Triton with tl.make_tensor_descriptor")
    monkeypatch.setattr(K, "TMA", True)
    docs = torch.stack([runs([300, 1, 499, 200]), runs([1000])])
    check(2, 8, 2, 1000, 64, AttentionMask(kind, doc_ids=docs), dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backend_parity(backend, kind):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    docs = torch.stack([runs([700, 324, 1000]), runs([2024])]).cuda()
    mask = AttentionMask(kind, doc_ids=docs)
    q = torch.randn(2, 8, 2024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 2024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 2024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    outs = []
    for name in (backend, "triton"):
        name_used, _ = A.select_backend(
            name, device="cuda", dtype=q.dtype, head_dim=64, mask=mask, q_len=2024, k_len=2024
        )
        assert name_used == name
        out = attention(q, k, v, mask, backend=name)
        outs.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **TOL[torch.bfloat16])


# ------------------------------------------------------------------------- GPU compilation without a GPU

AOT = r"""
import os
import sys
from megatron_dual.kernels import aot

for spec in sys.argv[1:]:
    arch, dtype, stages = spec.split(":")
    target = aot.TARGETS[arch]
    launches = aot.attention_launches("prefix-docs", dtype=dtype)  # specialised as the JIT would
    kernels = [("_fwd_kernel", 128, 64, False), ("_bwd_kv_kernel", 32, 128, False), ("_bwd_q_kernel", 128, 32, False)]
    if arch == "sm90":  # and each with TMA descriptors (MEGATRON_DUAL_ATTN_TMA=1)
        kernels += [(name, bm, bn, True) for name, bm, bn, _ in kernels]
    for name, bm, bn, tma in kernels:
        done = aot.compile_attention(aot.specialize(launches[name], target), target, (bm, bn, 4, int(stages)), tma)
        name += "_tma" * tma
        res = aot.resources(done, target)
        print(arch, name, res.get("pipelined_buffers", -1), res["spill_bytes"])
        with open(os.path.join(os.environ["AOT_TTIR_DIR"], f"{arch}{name}.ttir"), "w") as f:
            f.write(done.asm["ttir"])
"""


@pytest.mark.slow
def test_kernels_compile_for_gpus(tmp_path):
    """The compiled path (not the interpreter) lowers to a GPU binary for sm_90 (bf16, 4 stages; each kernel also with
    TMA descriptors), sm_80 (fp16, 3 stages) and gfx90a (bf16): prefix + documents, the most involved case, compiled
    from the model's own launches with the JIT's specialisation (aligned pointers and strides: without it the
    compiler lowers synchronous scalar loads the GPU never runs); one process for the three targets. On CUDA every
    kernel multi-buffers its tile loads and nothing spills. Every base pointer offset derived from a program id is
    int64 in the TTIR (a batch index times the packed qkv's batch stride passes 2^31 at 64 x 8192 tokens of 48
    heads x 128)."""
    import subprocess

    from ir_offsets import narrow_base_offsets

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["AOT_TTIR_DIR"] = str(tmp_path)
    targets = ["sm90:bfloat16:4", "sm80:float16:3", "gfx90a:bfloat16:1"]
    r = subprocess.run([sys.executable, "-c", AOT, *targets], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines()]
    kernels = ["_fwd_kernel", "_bwd_kv_kernel", "_bwd_q_kernel"]
    tma = [k + "_tma" for k in kernels]
    want = [(a, k) for a in ("sm90", "sm80", "gfx90a") for k in kernels + (tma if a == "sm90" else [])]
    assert [(a, k) for a, k, _, _ in rows] == want
    assert all(int(loads) > 0 for a, _, loads, _ in rows if a != "gfx90a")  # cp.async / TMA, not synchronous loads
    assert all(int(spills) == 0 for *_, spills in rows)
    ttir = sorted(tmp_path.glob("*.ttir"))
    assert len(ttir) == len(want)
    assert {f.name: narrow_base_offsets(f.read_text()) for f in ttir} == {f.name: [] for f in ttir}
