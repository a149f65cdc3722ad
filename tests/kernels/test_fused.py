"""Fused RMSNorm, rotary, SwiGLU and linear + cross-entropy + z-loss against plain PyTorch references.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before
any kernel is imported). With CUDA the same tests run the compiled kernels,
and the ``gpu`` tests add bf16 checks. bf16 dot products are wrong in the interpreter, so CPU tests use fp32/fp16.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F  # noqa: E402

from megatron_dual.config import ConfigError, ModelConfig, load_config  # noqa: E402
from megatron_dual.kernels.cross_entropy import default_chunk_size, fused_linear_cross_entropy  # noqa: E402
from megatron_dual.kernels.rmsnorm import FusedRMSNorm, rms_norm  # noqa: E402
from megatron_dual.kernels.rotary import apply_rotary as fused_apply_rotary  # noqa: E402
from megatron_dual.kernels.rotary import rotary_qkv_  # noqa: E402
from megatron_dual.kernels.swiglu import swiglu  # noqa: E402
from megatron_dual.model import AttentionMask, DualTransformer  # noqa: E402
from megatron_dual.model.fused import use_triton  # noqa: E402
from megatron_dual.model.loss import IGNORE, labelled_loss  # noqa: E402
from megatron_dual.model.rope import RotaryEmbedding, apply_rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare ``got`` (computed in ``dtype``) with an fp32 reference ``want``, tolerances scaled by ``scale``."""
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def grads(
    out: torch.Tensor | tuple[torch.Tensor, ...], inputs: tuple[torch.Tensor, ...], seed: int = 1
) -> tuple[torch.Tensor, ...]:
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    gos = tuple(torch.randn(o.shape, generator=gen).to(o) for o in outs)
    return torch.autograd.grad(outs, inputs, gos)


def leaf(shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEV, dtype).requires_grad_(True)


def upcast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().float().requires_grad_(True) for t in ts)


# ------------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden", [(1, 100), (17, 257), (130, 100), (3, 3554)])
def test_rmsnorm_matches_torch(rows, hidden, dtype):
    x = leaf((rows, hidden), dtype, 0, scale=3.0)
    w = leaf((hidden,), dtype, 1)
    y = rms_norm(x, w, 1e-7)
    assert y.dtype == dtype and y.shape == x.shape
    xr, wr = upcast(x, w)
    ref = F.rms_norm(xr, (hidden,), wr, 1e-7)
    close(y, ref, dtype)
    for got, want in zip(grads(y, (x, w)), grads(ref, (xr, wr)), strict=True):
        close(got, want, dtype, scale=4.0 if rows == 130 else 1.0)  # dweight sums 130 fp16-rounded rows


def test_rmsnorm_module_3d_and_tiny_eps():
    x = leaf((2, 5, 100), torch.float32, 2)
    norm = FusedRMSNorm(100, eps=1e-7).to(DEV)
    with torch.no_grad():
        norm.weight.normal_()
    ref_norm = torch.nn.RMSNorm(100, eps=1e-7).to(DEV)
    ref_norm.load_state_dict(norm.state_dict())
    y, ref = norm(x), ref_norm(x)
    close(y, ref, torch.float32)
    close(grads(y, (x, norm.weight))[1], grads(ref, (x, ref_norm.weight))[1], torch.float32)
    # eps matters only for (near-)zero rows: a zero row stays finite and zero, as in torch
    z = torch.zeros(1, 100, device=DEV)
    assert torch.equal(norm(z), torch.zeros_like(z))


# ------------------------------------------------------------------------------------------------------- rotary
def _cos_sin(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(head_dim, 4096, 160_000.0).to(DEV).cos_sin(positions.to(DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "b,t,hq,hkv,d,per_batch",
    [(1, 1, 2, 2, 64, False), (2, 17, 4, 2, 64, True), (1, 130, 2, 1, 128, False), (3, 5, 3, 3, 50, False)],
)
def test_rotary_qkv_in_place_matches_reference(b, t, hq, hkv, d, per_batch, dtype):
    qkv0 = leaf((b, t, (hq + 2 * hkv) * d), dtype, 3)
    positions = torch.stack([torch.arange(t) + 7 * i for i in range(b)]) if per_batch else torch.arange(t) + 3
    cos, sin = _cos_sin(d, positions)

    def reference(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, hq, d).transpose(1, 2)
        k = k.view(b, t, hkv, d).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.reshape(b, t, hkv, d).transpose(1, 2)

    qkv = qkv0 * 1  # a non-leaf, like the projection's output
    out = rotary_qkv_(qkv, cos, sin, hq + hkv, d)
    assert out is qkv  # in place
    q, k, v = (s.transpose(1, 2) for s in out.view(b, t, -1, d).split([hq, hkv, hkv], dim=2))
    qkv_r = upcast(qkv0)[0]
    ref = reference(qkv_r)
    for got, want in zip((q, k, v), ref, strict=True):
        close(got, want, dtype)
    assert torch.equal(v, qkv0.detach().view(b, t, -1, d)[:, :, hq + hkv :].transpose(1, 2))  # v untouched
    close(grads((q, k, v), (qkv0,))[0], grads(ref, (qkv_r,))[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_out_of_place_non_contiguous(dtype):
    b, h, t, d = 2, 3, 17, 64
    x0 = leaf((b, t, h, d), dtype, 4)
    x = x0.transpose(1, 2)  # (B, H, T, D) with the projection's strides
    cos, sin = _cos_sin(d, torch.arange(t))
    y = fused_apply_rotary(x, cos, sin)
    (xr,) = upcast(x0)
    ref = apply_rotary(xr.transpose(1, 2), cos, sin)
    close(y, ref, dtype)
    close(grads(y, (x0,))[0], grads(ref, (xr,))[0], dtype)
    assert torch.equal(x0.detach(), x.detach().transpose(1, 2))  # input not modified


# ------------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,inter", [(1, 100), (17, 257), (130, 100), (2, 3554)])
def test_swiglu_matches_reference(rows, inter, dtype):
    x = leaf((rows, 2 * inter), dtype, 5, scale=2.0)
    y = swiglu(x)
    assert y.shape == (rows, inter) and y.dtype == dtype
    (xr,) = upcast(x)
    up, gate = xr.chunk(2, dim=-1)  # the model's SwiGLU: first half is up, second half is gated
    ref = up * F.silu(gate)
    close(y, ref, dtype)
    close(grads(y, (x,))[0], grads(ref, (xr,))[0], dtype)


def test_swiglu_gates_the_second_half():
    x = torch.tensor([[2.0, -30.0]], device=DEV)  # up = 2, gate = -30: silu(gate) ~ 0
    assert abs(float(swiglu(x))) < 1e-9
    x = torch.tensor([[-30.0, 2.0]], device=DEV)  # up = -30, gate = 2
    assert float(swiglu(x)) == pytest.approx(-30.0 * 2.0 / (1.0 + torch.exp(torch.tensor(-2.0)).item()), rel=1e-5)


# ------------------------------------------------------------------------------------------ linear + CE + z-loss
def ce_reference(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, tw: torch.Tensor, z: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = F.linear(h, w, b).float()
    keep = y != IGNORE
    logits, yk, twk = logits[keep], y[keep], tw[keep].float()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(1, yk[:, None]).squeeze(1)
    weighted = (twk * (nll + z * lse.square())).sum()
    correct = (logits.argmax(-1) == yk).sum().float()
    return weighted, (twk * nll).sum().detach(), (twk * lse.square()).sum().detach(), correct


def ce_inputs(n: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int = 0, bias: bool = True):
    h = leaf((n, hidden), dtype, seed)
    w = leaf((vocab, hidden), dtype, seed + 1, scale=0.5)
    b = leaf((vocab,), dtype, seed + 2) if bias else None
    gen = torch.Generator().manual_seed(seed + 3)
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.2] = IGNORE
    tw = 1.0 / torch.rand(n, generator=gen).clamp_min(0.05)  # MD-style 1/t weights
    return h, w, b, y.to(DEV), tw.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n,hidden,vocab,chunk",
    [(1, 100, 257, None), (17, 64, 100, 7), (130, 100, 257, 64), (130, 32, 1500, None), (37, 16, 300, 130)],
)
def test_fused_ce_matches_reference(n, hidden, vocab, chunk, dtype):
    h, w, b, y, tw = ce_inputs(n, hidden, vocab, dtype)
    if n == 1:
        y[0] = 5  # one labelled row
    z = 1e-2  # larger than the recipe's 1e-4 so the z-loss gradient is visible in the comparison
    got = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=z, chunk_size=chunk)
    hr, wr, br = upcast(h, w, b)
    ref = ce_reference(hr, wr, br, y, tw, z)
    scale = 1.0 if dtype == torch.float32 else 5.0  # fp16 logits vs fp32
    for g, r in zip((got.weighted, got.nll, got.z), ref[:3], strict=True):
        close(g, r, dtype, scale=scale * max(1.0, float(r.detach().abs()) / 100))
    if dtype == torch.float32:
        assert float(got.correct) == float(ref[3])
    for g, r in zip(grads(got.weighted, (h, w, b)), grads(ref[0], (hr, wr, br)), strict=True):
        close(g, r, dtype, scale=scale)


def test_fused_ce_all_ignored_no_bias_and_grad_scale():
    h, w, _, y, tw = ce_inputs(9, 16, 50, torch.float32, bias=False)
    y[:] = IGNORE
    got = fused_linear_cross_entropy(h, w, None, y, tw, z_loss=1e-4, chunk_size=4)
    assert float(got.weighted.detach()) == 0.0 and float(got.correct) == 0.0
    gh, gw = torch.autograd.grad(got.weighted, (h, w))
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    # the backward scales the forward-computed gradients by the incoming gradient
    h, w, b, y, tw = ce_inputs(9, 16, 50, torch.float32, seed=4)
    got = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=1e-4, chunk_size=4)
    g1 = torch.autograd.grad(got.weighted, (h, w, b), retain_graph=True)
    g3 = torch.autograd.grad(got.weighted * -3.0, (h, w, b))
    for a, c in zip(g1, g3, strict=True):
        torch.testing.assert_close(c, -3.0 * a)


def test_fused_ce_no_grad_matches(monkeypatch):
    import megatron_dual.kernels.cross_entropy as ce

    h, w, b, y, tw = ce_inputs(17, 16, 60, torch.float32, seed=9)
    with_grad = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=1e-3, chunk_size=8)
    launches = []
    monkeypatch.setattr(ce, "_ce_grad_kernel", type("Spy", (), {"__getitem__": lambda self, g: launches.append(g)})())
    with torch.no_grad():  # validation: sums only, no gradient kernels
        got = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=1e-3, chunk_size=8)
    assert not got.weighted.requires_grad and launches == []
    for f in ("weighted", "nll", "z", "correct"):
        torch.testing.assert_close(getattr(got, f), getattr(with_grad, f).detach())


def test_fused_ce_under_cpu_autocast_matches_unfused_path():
    if DEV != "cpu":
        pytest.skip("CPU autocast variant")
    h, w, b, y, tw = ce_inputs(21, 32, 100, torch.float32, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=1e-4, chunk_size=8)
        ref = ce_reference(h, w, b, y, tw, 1e-4)  # the linear runs in bf16 under autocast, CE in fp32
    torch.testing.assert_close(got.weighted, ref[0], atol=1e-3, rtol=1e-3)
    for g, r in zip(grads(got.weighted, (h, w, b)), grads(ref[0], (h, w, b)), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-2 * float(r.abs().max()), rtol=2e-2)  # bf16 dlogits on both


def test_default_chunk_size_bounds():
    assert default_chunk_size(1, 1024, 51200) == 1
    assert default_chunk_size(16384, 1024, 51200) == 4096  # 8 * 16384 / 50 -> 4096 (cap)
    assert default_chunk_size(2000, 1024, 51200) == 512
    assert 64 <= default_chunk_size(10_000, 4096, 128_000) <= 4096


# --------------------------------------------------------------------------------------- vocab-parallel (gloo)
def _vocab_parallel_worker(rank: int, world: int, store_path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        n, hidden, vocab, z = 23, 16, 2 * 37, 1e-2
        h, w, b, y, tw = ce_inputs(n, hidden, vocab, torch.float32, seed=11)
        y[:4] = torch.tensor([0, 36, 37, 73])  # first/last ids of both shards
        with torch.no_grad():
            w[5] = w[40]  # identical rows in both shards: the global argmax must be the smaller id
            b[5] = b[40]
            h[6] = w[5] * 50
        y[6] = 40
        full = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=z, chunk_size=5)
        ref = grads(full.weighted, (h, w, b))
        shard = slice(rank * vocab // world, (rank + 1) * vocab // world)
        hs = h.detach().clone().requires_grad_(True)
        ws = w.detach()[shard].clone().requires_grad_(True)
        bs = b.detach()[shard].clone().requires_grad_(True)
        group = dist.new_group([0, 1])  # an explicit group object, as the TP code passes
        got = fused_linear_cross_entropy(hs, ws, bs, y, tw, z_loss=z, chunk_size=5, group=group)
        fields = ("weighted", "nll", "z", "correct")
        for g, r in zip((getattr(got, f) for f in fields), (getattr(full, f) for f in fields), strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        gh, gw, gb = grads(got.weighted, (hs, ws, bs))
        torch.testing.assert_close(gh, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, ref[1][shard], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gb, ref[2][shard], atol=1e-5, rtol=1e-5)
        # without the input-grad reduction each rank holds its shard's partial dh; their sum is the full dh
        part = fused_linear_cross_entropy(
            hs, ws, bs, y, tw, z_loss=z, chunk_size=5, group=group, reduce_input_grad=False, vocab_start=shard.start
        )
        (ph,) = grads(part.weighted, (hs,))
        assert not torch.allclose(ph, ref[0], atol=1e-3)
        dist.all_reduce(ph, group=group)
        torch.testing.assert_close(ph, ref[0], atol=1e-5, rtol=1e-5)
        # shards in the other order (rank 0 holds the upper half): vocab_start says where each begins
        other = slice((1 - rank) * vocab // world, (2 - rank) * vocab // world)
        swapped = fused_linear_cross_entropy(
            hs,
            w.detach()[other],
            b.detach()[other],
            y,
            tw,
            z_loss=z,
            chunk_size=5,
            group=group,
            vocab_start=other.start,
        )
        for f in fields:
            torch.testing.assert_close(getattr(swapped, f), getattr(full, f).detach(), atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_ce_two_gloo_ranks_match_single_process(tmp_path):
    if DEV != "cpu":
        pytest.skip("the gloo variant runs on CPU")
    import torch.multiprocessing as mp

    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------- model integration
def _tiny(fused: str) -> ModelConfig:
    # head_dim 50 (half 25: not a power of two), MLP 172, vocab 300
    return ModelConfig(
        n_layers=2,
        hidden_size=100,
        n_heads=2,
        n_kv_heads=1,
        intermediate_size=172,
        vocab_size=300,
        max_seq_len=64,
        rope_theta=10_000.0,
        fused_ops=fused,
    )


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
def test_training_step_fused_equals_unfused(kind):
    torch.manual_seed(0)
    plain = DualTransformer(_tiny("none")).to(DEV)
    with torch.no_grad():
        for p in plain.parameters():  # the reference init zeroes some projections; make every path matter
            p.normal_(0.0, 0.1)
    fused = DualTransformer(_tiny("triton")).to(DEV)
    assert list(fused.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    fused.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    b, t = 2, 33
    ids = torch.randint(16, 300, (b, t), generator=gen).to(DEV)
    labels = torch.randint(16, 300, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.5] = IGNORE
    weights = (1.0 / torch.rand(b, t, generator=gen).clamp_min(0.1)).to(DEV)
    doc = torch.zeros(b, t, dtype=torch.long)
    doc[:, 20:] = 1
    mask = AttentionMask(kind, doc_ids=doc.to(DEV))
    results = []
    for model in (plain, fused):
        model.zero_grad(set_to_none=True)
        sums = labelled_loss(model.head, model(ids, mask), labels.to(DEV), weights, 1e-2)
        nodes = graph_nodes(sums.weighted)
        if "FlashAttentionQKVFunctionBackward" in nodes:  # on GPU, Triton attention takes the rotary with it
            nodes.add("RotaryQKVInplaceBackward")
        fused_nodes = {
            "RMSNormFunctionBackward",
            "RotaryQKVInplaceBackward",
            "SwiGLUFunctionBackward",
            "FusedLinearCrossEntropyBackward",
        }
        assert (fused_nodes <= nodes) == (model is fused), sorted(nodes)  # the kernels ran, and only in the fused model
        (sums.weighted / sums.count).backward()
        results.append((sums, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_g), (got, got_g) = results
    torch.testing.assert_close(got.weighted, ref.weighted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.nll, ref.nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.z, ref.z, atol=1e-5, rtol=1e-5)
    assert float(got.correct) == float(ref.correct) and got.count == ref.count
    for name, g in ref_g.items():
        assert got_g[name] is not None, name
        torch.testing.assert_close(got_g[name], g, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_ops_config_and_dispatch():
    x = torch.zeros(1)
    assert not use_triton("auto", x) and not use_triton("none", x) and use_triton("triton", x)
    with pytest.raises(ValueError, match="fused_ops"):
        use_triton("cuda", x)
    assert load_config(preset="tiny").model.fused_ops == "auto"
    with pytest.raises(ConfigError, match="model.fused_ops"):
        load_config(preset="tiny", overrides=["model.fused_ops=fast"])


# ----------------------------------------------------------------------- GPU compilation without a GPU
AOT = r"""
import json
import os
import sys
from megatron_dual.kernels import aot

arch, dtype = sys.argv[1], sys.argv[2]
target = aot.TARGETS[arch]
rows = {}
for name, launch in aot.fused_launches(dtype, aot.SM_COUNT[arch]).items():
    spec = aot.specialize(launch, target)
    done = aot.compile_launch(spec, target, launch.options().get("num_warps", 4), launch.options().get("num_stages"))
    with open(os.path.join(os.environ["AOT_TTIR_DIR"], name + ".ttir"), "w") as f:
        f.write(done.asm["ttir"])
    binary = len(done.asm.get("cubin", done.asm.get("hsaco", b"")))
    rows[name] = {"binary": binary, "sig": spec.signature} | aot.resources(done, target) | aot.memory_ops(done, target)
print(json.dumps(rows))
"""
AOT_KERNELS = [
    "_rmsnorm_fwd_kernel",
    "_rmsnorm_bwd_kernel",
    "_rmsnorm_fwd_kernel_add",
    "_rmsnorm_bwd_kernel_add",
    "_rotary_kernel",
    "_rotary_kernel_bwd",
    "_swiglu_fwd_kernel",
    "_swiglu_bwd_kernel",
    "_ce_stats_kernel",
    "_ce_grad_kernel",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [("sm90", "bfloat16"), ("sm80", "float16"), ("gfx90a", "bfloat16")],
    ids=["sm90-bf16", "sm80-fp16", "mi250x-bf16"],
)
def test_fused_kernels_compile_for_gpus(target, tmp_path):
    """The compiled path (not the interpreter) lowers every fused kernel to a GPU binary as the JIT specialises the
    dual-470m launches (recorded from the host code, ``kernels.aot.fused_launches``: fp32 residual stream, 16-bit
    activations, aligned pointers and strides): no spills, vectorised global loads, and every base pointer offset
    derived from a program id is int64 in the TTIR."""
    import json
    import subprocess

    from ir_offsets import narrow_base_offsets

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["AOT_TTIR_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", AOT, *target], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.splitlines()[-1])
    assert list(rows) == AOT_KERNELS
    act = {"bfloat16": "*bf16", "float16": "*fp16"}[target[1]]
    assert rows["_rmsnorm_fwd_kernel_add"]["sig"]["x_ptr"] == "*fp32"  # the residual stream
    assert rows["_rmsnorm_fwd_kernel_add"]["sig"]["d_ptr"] == act == rows["_swiglu_fwd_kernel"]["sig"]["x_ptr"]
    for name, row in rows.items():
        assert row["binary"] > 0 and row["spill_bytes"] == 0 and row["vec_loads"] > 0, (name, row)
    narrow = {k: narrow_base_offsets((tmp_path / f"{k}.ttir").read_text()) for k in AOT_KERNELS}
    assert narrow == {k: [] for k in AOT_KERNELS}


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("rows,hidden", [(130, 1024), (2048, 3554)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_rmsnorm_swiglu_rotary(rows, hidden):
    dt = torch.bfloat16
    x, w = leaf((rows, hidden), dt, 0), leaf((hidden,), dt, 1)
    y = rms_norm(x, w, 1e-7)
    xr, wr = upcast(x, w)
    ref = F.rms_norm(xr, (hidden,), wr, 1e-7)
    close(y, ref, dt)
    for g, r in zip(grads(y, (x, w)), grads(ref, (xr, wr)), strict=True):
        close(g, r, dt, scale=4.0 if g.dim() == 1 else 1.0)
    u = leaf((rows, 2 * hidden), dt, 2)
    (ur,) = upcast(u)
    up, gate = ur.chunk(2, -1)
    ref = up * F.silu(gate)
    close(swiglu(u), ref, dt)
    close(grads(swiglu(u), (u,))[0], grads(ref, (ur,))[0], dt)
    b, t, hq, d = 2, rows // 2 or 1, 16, 64
    x = leaf((b, hq, t, d), dt, 3)
    (xr,) = upcast(x)
    cos, sin = _cos_sin(d, torch.arange(t))
    close(fused_apply_rotary(x, cos, sin), apply_rotary(xr, cos, sin), dt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_fused_ce_matches_autocast_and_saves_memory():
    n, hidden, vocab = 8192, 1024, 51200
    h, w, b, y, tw = ce_inputs(n, hidden, vocab, torch.float32, seed=3)
    w.data.mul_(0.05)
    hb = h.detach().to(torch.bfloat16).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(hb, w, b, y, tw, z_loss=1e-4)
    g_got = torch.autograd.grad(got.weighted, (hb, w, b))
    fused_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = ce_reference(hb, w, b, y, tw, 1e-4)
    g_ref = torch.autograd.grad(ref[0], (hb, w, b))
    unfused_peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(got.weighted, ref[0], rtol=2e-3, atol=1.0)
    for g, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=5e-2)
    assert fused_peak * 4 <= unfused_peak, (fused_peak, unfused_peak)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_training_step_fused_vs_unfused():
    torch.manual_seed(0)
    plain = DualTransformer(_tiny("none")).cuda()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.05)
    fused = DualTransformer(_tiny("auto")).cuda()
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(16, 300, (4, 64), device="cuda")
    labels = torch.randint(16, 300, (4, 64), device="cuda")
    weights = torch.ones(4, 64, device="cuda")
    mask = AttentionMask("causal")
    losses = []
    for model in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sums = labelled_loss(model.head, model(ids, mask), labels, weights, 1e-4)
        (sums.weighted / sums.count).backward()
        losses.append(sums.weighted / sums.count)
    torch.testing.assert_close(losses[1], losses[0], atol=2e-2, rtol=1e-2)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        rel = float((q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
        assert rel < 3e-2, f"{name}: relative gradient difference {rel:.3g} (bf16 rounding differs in the order)"
