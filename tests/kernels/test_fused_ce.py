"""Fused linear + CE (issue 14 part 5): the bias gradient folded into the gradient kernel, dW accumulated in fp32,
and no gather when nearly every position is labelled.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, tests/conftest.py); bf16 dot products
are wrong there, so CPU tests use fp32/fp16. The AOT compilation of the gradient kernel for sm_90/sm_80/gfx90a is in
tests/kernels/test_fused.py (``test_fused_kernels_compile_for_gpus``).
"""

from __future__ import annotations

import pytest
import torch

from megatron_dual.kernels import cross_entropy as ce  # noqa: E402
from megatron_dual.kernels.cross_entropy import (  # noqa: E402
    fp32_out_addmm,
    fused_linear_cross_entropy,
    previous_grad_path,
)
from megatron_dual.model import loss as loss_mod  # noqa: E402
from megatron_dual.model.head import LMHead  # noqa: E402
from megatron_dual.model.loss import IGNORE, host_labelled_count, labelled_loss, reference_loss  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _logits_case(rows: int, vocab: int, dtype: torch.dtype, seed: int, vocab_start: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(DEV, dtype)
    labels = torch.randint(vocab_start - 5, vocab_start + vocab + 5, (rows,), generator=gen)  # some off the shard
    labels[torch.rand(rows, generator=gen) < 0.2] = IGNORE
    scale = (torch.rand(rows, generator=gen) * 3).to(DEV)
    scale[labels == IGNORE] = 0.0
    lse = torch.logsumexp(logits.double(), dim=-1).float()  # as the stats kernel gives it (fp32)
    return logits, labels.to(DEV), scale, lse


def _grad_reference(logits, labels, scale, lse, z, vocab_start):
    x, lse64 = logits.double(), lse.double()[:, None]
    onehot = torch.zeros_like(x)
    local = labels - vocab_start
    inside = (local >= 0) & (local < x.shape[1])
    onehot[inside.nonzero(as_tuple=True)[0], local[inside]] = 1.0
    return scale.double()[:, None] * (torch.exp(x - lse64) * (1.0 + 2.0 * z * lse64) - onehot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,vocab,vocab_start", [(1, 3, 0), (37, 257, 0), (130, 1500, 700), (19, 2049, 3)])
def test_grad_kernel_writes_the_gradient_and_its_column_sums(rows, vocab, vocab_start, dtype):
    """Odd shapes: several row programs (S > 1), several row tiles per program, partial column blocks."""
    z = 1e-2
    logits, labels, scale, lse = _logits_case(rows, vocab, dtype, seed=rows + vocab, vocab_start=vocab_start)
    want = _grad_reference(logits, labels, scale, lse, z, vocab_start)
    s = ce._row_programs(rows, vocab, logits.device)
    partial = torch.zeros(s + 1, vocab, device=DEV)  # one spare row: must stay untouched
    partial[-1] = 7.0
    ce._chunk_grads(logits, labels, lse, scale, None, None, (None, None, partial), slice(0, rows), vocab_start, z)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(logits.double(), want, **tol)
    # the column sums come from the fp32 gradient before it is rounded to the logits' dtype: fp32-exact for fp16 too
    torch.testing.assert_close(partial[:-1].sum(0).double(), want.sum(0), atol=1e-5, rtol=1e-5)
    assert torch.equal(partial[-1], torch.full((vocab,), 7.0, device=DEV))
    if rows > 16:
        assert s > 1  # the split over rows is exercised


def test_grad_kernel_accumulates_into_its_partials_over_chunks():
    logits, labels, scale, lse = _logits_case(40, 300, torch.float32, seed=5)
    want = _grad_reference(logits, labels, scale, lse, 0.0, 0).sum(0)
    partial = torch.zeros(ce._row_programs(20, 300, logits.device), 300, device=DEV)
    for rows in (slice(0, 20), slice(20, 40)):  # two chunks into the same partials, as the forward loop does
        chunk = logits[rows].clone()
        ce._chunk_grads(chunk, labels[rows], lse[rows], scale[rows], None, None, (None, None, partial), rows, 0, 0.0)
    torch.testing.assert_close(partial.sum(0).double(), want, atol=1e-5, rtol=1e-5)


def _ce_case(n: int, hidden: int, vocab: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype).requires_grad_(True)

    h, w, b = leaf(n, hidden), leaf(vocab, hidden, scale=0.5), leaf(vocab)
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.25] = IGNORE
    tw = 1.0 / torch.rand(n, generator=gen).clamp_min(0.05)
    return h, w, b, y.to(DEV), tw.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,hidden,vocab,chunk", [(45, 24, 1100, 16), (9, 20, 77, None)])
def test_fused_ce_gradients_match_reference_loss(n, hidden, vocab, chunk, dtype):
    h, w, b, y, tw = _ce_case(n, hidden, vocab, dtype, seed=n)
    z = 1e-2
    got = fused_linear_cross_entropy(h, w, b, y, tw, z_loss=z, chunk_size=chunk)
    hr, wr, br = (t.detach().double().requires_grad_(True) for t in (h, w, b))
    ref = reference_loss(hr @ wr.t() + br, y, tw.double(), z).double()
    fp32 = dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5) if fp32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(got.weighted.double(), ref, atol=0.0, rtol=1e-5 if fp32 else 5e-3)
    g_got = torch.autograd.grad(got.weighted, (h, w, b))
    g_ref = torch.autograd.grad(ref, (hr, wr, br))
    for name, g, r in zip(("dh", "dw", "db"), g_got, g_ref, strict=True):
        scale = float(r.abs().max())
        torch.testing.assert_close(g.double() / scale, r / scale, **tol, msg=lambda m, k=name: f"{k}: {m}")


def test_folded_bias_gradient_matches_the_previous_separate_pass():
    h, w, b, y, tw = _ce_case(70, 16, 600, torch.float32, seed=3)
    new = torch.autograd.grad(fused_linear_cross_entropy(h, w, b, y, tw, 1e-3, chunk_size=32).weighted, (h, w, b))
    with previous_grad_path():
        old = torch.autograd.grad(fused_linear_cross_entropy(h, w, b, y, tw, 1e-3, chunk_size=32).weighted, (h, w, b))
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])  # fp32 dh and dW: the same ops as before
    torch.testing.assert_close(new[2], old[2], atol=1e-6, rtol=1e-6)  # db: another summation order
    assert ce._PATH.fold_db and ce._PATH.fp32_wgrad  # the context restored the default


def test_fp32_weight_gradient_accumulation_paths():
    # CPU builds have no addmm(out_dtype=) kernel: the probe says no and the 16-bit product path is taken
    assert not fp32_out_addmm(torch.device("cpu"), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    g, h = torch.randn(33, 70, generator=gen), torch.randn(33, 20, generator=gen)
    dw = torch.randn(70, 20, generator=gen)
    want = dw.clone().addmm_(g.t(), h)
    ce._accumulate_wgrad(dw, g, h)
    assert torch.equal(dw, want)  # fp32 operands: bit-identical to the previous in-place addmm
    acc = torch.zeros(70, 20)
    ce._accumulate_wgrad(acc, g.half(), h.half())
    torch.testing.assert_close(acc, (g.half().t() @ h.half()).float())


# ----------------------------------------------------------------------------------------- no gather (loss.py)
def _head_case(unlabelled_every: int, fused: str = "triton", seed: int = 0):
    """A small head and (2, 23) positions, every ``unlabelled_every``-th one unlabelled (20: 43 of 46 labelled)."""
    torch.manual_seed(seed)
    head = LMHead(24, 130, 1e-6, fused_ops=fused).to(DEV)
    head.reset_parameters()
    with torch.no_grad():
        head.out.bias.normal_(0.0, 0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(2, 23, 24, generator=gen).to(DEV).requires_grad_(True)
    labels = torch.randint(0, 130, (2, 23), generator=gen)
    labels.view(-1)[::unlabelled_every] = IGNORE
    weights = torch.where(labels != IGNORE, 1.0 / torch.rand(2, 23, generator=gen).clamp_min(0.1), 0.0)
    return head, hidden, labels.to(DEV), weights.to(DEV)


def _run(head, hidden, labels, weights, monkeypatch, **kw):
    calls = []
    real = torch.Tensor.nonzero

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "nonzero", counted)
        sums = labelled_loss(head, hidden, labels, weights, 1e-2, **kw)
    params = (hidden, *head.parameters())
    return sums, torch.autograd.grad(sums.weighted, params), len(calls)


def test_nearly_all_labelled_runs_the_head_on_every_row_without_gather(monkeypatch):
    head, hidden, labels, weights = _head_case(20)
    count = int((labels != IGNORE).sum())
    assert loss_mod.ALL_ROWS_FRACTION * labels.numel() <= count < labels.numel()
    got, g_got, gathers = _run(head, hidden, labels, weights, monkeypatch, n_labelled=count)
    assert gathers == 0 and got.count == count
    monkeypatch.setattr(loss_mod, "ALL_ROWS_FRACTION", 2.0)  # never: the gather path, as before
    ref, g_ref, gathers = _run(head, hidden, labels, weights, monkeypatch, n_labelled=count)
    assert gathers == 1 and ref.count == count
    for f in ("weighted", "nll", "z"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), atol=1e-5, rtol=1e-5)
    assert float(got.correct) == float(ref.correct)
    for g, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    full = reference_loss(head(hidden), labels, weights, 1e-2)
    torch.testing.assert_close(got.weighted, full, atol=1e-4, rtol=1e-5)


def test_gather_kept_below_the_threshold_and_on_the_unfused_path(monkeypatch):
    head, hidden, labels, weights = _head_case(2)
    _, _, gathers = _run(head, hidden, labels, weights, monkeypatch, n_labelled=int((labels != IGNORE).sum()))
    assert gathers == 1  # MD-like share: gather
    # the PyTorch-ops path (the CPU default, fused_ops auto on CPU) is unchanged: gather, same floats with or
    # without a host count
    head, hidden, labels, weights = _head_case(20, fused="auto" if DEV == "cpu" else "none")
    a, ga, gathers = _run(head, hidden, labels, weights, monkeypatch, n_labelled=int((labels != IGNORE).sum()))
    b, gb, _ = _run(head, hidden, labels, weights, monkeypatch)
    assert gathers == 1 and torch.equal(a.weighted, b.weighted)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_host_labelled_count_never_reads_the_device():
    labels = torch.tensor([[1, IGNORE, 3]])
    assert host_labelled_count(labels) == 2 and host_labelled_count(labels, 5) == 5
    assert host_labelled_count(labels.to("meta")) is None  # a device tensor without a host count: unknown


def test_objective_batch_counts_labels_on_the_host():
    from megatron_dual.objectives import ar_batch

    tokens = torch.arange(20, 38).reshape(2, 9)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [2] * 9])
    b = ar_batch(tokens, doc_ids)
    assert b.n_labelled == int((b.labels != IGNORE).sum()) == 15  # one boundary in the first row
    assert b.to("meta").n_labelled == 15  # carried to the device, never recounted there


def test_trainer_passes_the_host_count_to_the_loss(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/toy.py
    from toy import tiny_overrides, write_random_corpus

    import megatron_dual.trainer as trainer_mod
    from megatron_dual.config import load_config

    corpus = write_random_corpus(str(tmp_path / "toy_text_document"), n_docs=30)
    tr = trainer_mod.Trainer(load_config(overrides=tiny_overrides(corpus, tmp_path / "out")), quiet=True)
    seen = []

    def recording(*a, **k):
        seen.append((k.get("n_labelled"), int((a[2] != IGNORE).sum())))
        return labelled_loss(*a, **k)

    monkeypatch.setattr(trainer_mod, "labelled_loss", recording)
    with torch.no_grad():
        for b in tr.loader.batches(0).batches:
            tr.forward_loss(b)
    assert len(seen) == 4 and all(given == counted > 0 for given, counted in seen), seen


# ------------------------------------------------------------------------------- vocab-parallel, no gather (gloo)
def _vocab_parallel_worker(rank: int, world: int, store_path: str) -> None:
    import torch.distributed as dist

    from megatron_dual.parallel.layers import VocabParallelLMHead

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        head, hidden, labels, weights = _head_case(20, seed=4)
        group = dist.new_group([0, 1])
        tp_head = VocabParallelLMHead.from_head(head, group)
        params = (hidden, *tp_head.parameters())
        got = labelled_loss(tp_head, hidden, labels, weights, 1e-2)  # CPU labels: counted, >= 0.9: no gather
        g_got = torch.autograd.grad(got.weighted, params)
        loss_mod.ALL_ROWS_FRACTION = 2.0
        ref = labelled_loss(tp_head, hidden, labels, weights, 1e-2)
        g_ref = torch.autograd.grad(ref.weighted, params)
        torch.testing.assert_close(got.weighted, ref.weighted, atol=1e-5, rtol=1e-5)
        assert float(got.correct) == float(ref.correct) and got.count == ref.count
        for g, r in zip(g_got, g_ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_no_gather_two_gloo_ranks(tmp_path):
    if DEV != "cpu":
        pytest.skip("the gloo variant runs on CPU")
    import torch.multiprocessing as mp

    mp.spawn(_vocab_parallel_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


# ------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_wgrad_accumulation_is_more_accurate_and_allocates_nothing():
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(4096, 8192, device="cuda", generator=gen).bfloat16()
    h = torch.randn(4096, 1024, device="cuda", generator=gen).bfloat16()
    want = g.double().t() @ h.double()
    dw = torch.zeros(8192, 1024, device="cuda")
    ce._accumulate_wgrad(torch.zeros_like(dw), g, h)  # warm-up: the probe, cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ce._accumulate_wgrad(dw, g, h)
    extra = torch.cuda.max_memory_allocated() - before
    with previous_grad_path():
        old = torch.zeros_like(dw)
        ce._accumulate_wgrad(old, g, h)
    err_new, err_old = float((dw.double() - want).abs().max()), float((old.double() - want).abs().max())
    print(f"fp32_out_addmm={fp32_out_addmm(dw.device, torch.bfloat16)} torch {torch.__version__}")
    print(f"max abs error new {err_new:.3g} old {err_old:.3g}; extra bytes {extra}")
    if fp32_out_addmm(dw.device, torch.bfloat16):
        assert extra < 2**20 and err_new < err_old
    else:
        assert err_new == err_old


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_no_gather_path_never_waits_for_the_device(monkeypatch):
    head, hidden, labels, weights = _head_case(20, fused="auto")
    count = int((labels != IGNORE).sum())
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: kernels compiled, fp32_out_addmm probed
        labelled_loss(head, hidden, labels, weights, 1e-2, n_labelled=count).weighted.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host read of device memory now raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = labelled_loss(head, hidden, labels, weights, 1e-2, n_labelled=count)
        g_got = torch.autograd.grad(got.weighted, (hidden, *head.parameters()))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(loss_mod, "ALL_ROWS_FRACTION", 2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = labelled_loss(head, hidden, labels, weights, 1e-2, n_labelled=count)
    g_ref = torch.autograd.grad(ref.weighted, (hidden, *head.parameters()))
    torch.testing.assert_close(got.weighted, ref.weighted, atol=1e-2, rtol=1e-2)
    for g, r in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2 * float(r.abs().max()), rtol=5e-2)
