"""Issue 14 part 5: batched Newton-Schulz, foreach/fused AdamW and foreach gradient norms.

The CPU defaults keep the floats of the code before them bit for bit (per-block Newton-Schulz, the single-tensor
AdamW loop, the per-tensor norm loop: ``make demo``'s losses are pinned); the batched and foreach paths (the CUDA
defaults, run here on CPU in fp32) agree with them to rounding, on 2 gloo ranks too (DP owners, TP shards)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_dual.config import OptimizerConfig, load_config
from megatron_dual.engine.ddp import clip_grad_norm_, global_grad_norm
from megatron_dual.model import DualTransformer
from megatron_dual.model.padding import pad, padding_of
from megatron_dual.optim import muon as muon_mod
from megatron_dual.optim.muon import (
    Muon,
    build_optimizers,
    logical_blocks,
    muon_lr_scale,
    orthogonalise_blocks,
    zeropower_newton_schulz,
)
from megatron_dual.parallel.testing import run_distributed

NS_ATOL = 1e-5  # batched (bmm/baddbmm) vs per-block (mm) fp32 Newton-Schulz: entries are O(1), diffs ~1e-6


def _blocks(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 12), (4, 12), (4, 12), (20, 6), (6, 20), (12, 12), (12, 12), (5, 7), (7, 5), (1, 9)]
    blocks = [torch.randn(s, generator=g) for s in shapes]
    blocks[3][15:] = 0  # padded rows of a tall block (transposed into the wide stack) stay exactly zero
    return blocks


@pytest.mark.parametrize("cap", [muon_mod.NS_BATCH_NUMEL, 150])  # one stack per shape; a chunk per matrix or two
def test_batched_newton_schulz_equals_per_block(monkeypatch, cap):
    monkeypatch.setattr(muon_mod, "NS_BATCH_NUMEL", cap)
    srcs = _blocks()
    scales = [0.5 + i for i in range(len(srcs))]
    outs = {}
    for batched in (False, True):
        dsts = [torch.full_like(s, float("nan")) for s in srcs]
        orthogonalise_blocks([(s, d, k, 5) for s, d, k in zip(srcs, dsts, scales, strict=True)], batched)
        outs[batched] = dsts
    for s, k, ref, got in zip(srcs, scales, outs[False], outs[True], strict=True):
        assert torch.equal(ref, zeropower_newton_schulz(s, 5).mul_(k))  # unbatched: the per-block function exactly
        assert ref.abs().max() > 0.1 * k
        torch.testing.assert_close(got, ref, atol=NS_ATOL * k, rtol=0)
    assert torch.equal(outs[True][3][15:], torch.zeros(5, 6))


def _tiny_model() -> tuple[DualTransformer, OptimizerConfig]:
    over = ["model.n_layers=1", "model.hidden_size=32", "model.n_heads=2", "model.intermediate_size=40"]
    cfg = load_config(preset="tiny", overrides=[*over, "model.pad_intermediate_to=16", "optimizer.muon_head=true"])
    torch.manual_seed(0)
    return DualTransformer(cfg.model), cfg.optimizer


@torch.no_grad()
def _old_muon_step(opt: Muon, bufs: dict[int, torch.Tensor]) -> None:
    """The Muon step before batching, verbatim in its arithmetic: per parameter, momentum, Newton-Schulz per row
    block with its logical lr scale, then decay and update."""
    for group in opt.param_groups:
        for p in group["params"]:
            buf = bufs.setdefault(id(p), torch.zeros_like(p))
            buf.mul_(group["momentum"]).add_(p.grad)
            update = p.grad.add(buf, alpha=group["momentum"])
            splits = group["splits"] or [p.shape[0]]
            shapes = logical_blocks(p, splits, p.shape[1]) or [(n, p.shape[1]) for n in splits]
            out = torch.empty_like(update)
            for o, g, (r, c) in zip(out.split(splits), update.split(splits), shapes, strict=True):
                o.copy_(zeropower_newton_schulz(g, group["ns_steps"]).mul_(muon_lr_scale(r, c, group["adjust_lr"])))
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(out, alpha=-group["lr"])


def test_muon_cpu_default_keeps_the_per_matrix_floats_and_batched_agrees():
    """Fused q/k/v and up/gate (splits), a padded up/gate and down (logical scale), the head projection, the
    same-shape q/k/v/out and head blocks in one stack, down with up/gate transposed in another."""
    runs = {}
    for mode in ("old", None, True):
        model, ocfg = _tiny_model()
        opt = build_optimizers(model, ocfg)["muon"]
        opt.batched = mode if mode != "old" else None
        params = [p for g in opt.param_groups for p in g["params"]]
        assert any(padding_of(p) is not None for p in params) and any(g["splits"] for g in opt.param_groups)
        gen, bufs = torch.Generator().manual_seed(1), {}
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
                spec = padding_of(p)
                if spec is not None:  # as the model's gradients: zero in the padding
                    p.grad.mul_(pad(torch.ones(spec.logical_shape(p.shape)), spec))
            _old_muon_step(opt, bufs) if mode == "old" else opt.step()
        runs[mode] = [p.detach().clone() for p in params]
    for old, default, batched in zip(runs["old"], runs[None], runs[True], strict=True):
        assert torch.equal(default, old)
        torch.testing.assert_close(batched, old, atol=1e-6, rtol=0)  # updates ~lr * 0.2 * sqrt(64) ~ 1.6e-2
        assert torch.equal(batched == 0, old == 0)  # padding stays zero in both


def test_adamw_foreach_on_cpu_equals_the_single_tensor_loop_and_keeps_its_flags_on_load():
    model, ocfg = _tiny_model()
    ours = build_optimizers(model, ocfg)["adamw"]
    assert all(g["foreach"] and not g["fused"] for g in ours.param_groups)
    twin = [torch.nn.Parameter(p.detach().clone()) for g in ours.param_groups for p in g["params"]]
    it = iter(twin)
    groups = [{"params": [next(it) for _ in g["params"]], "weight_decay": g["weight_decay"]} for g in ours.param_groups]
    loop = torch.optim.AdamW(groups, lr=ours.param_groups[0]["lr"], betas=ocfg.betas, eps=ocfg.eps, foreach=False)
    gen = torch.Generator().manual_seed(2)
    mine = [p for g in ours.param_groups for p in g["params"]]
    for step in range(4):
        if step == 2:  # resume from the loop's state: its foreach=False must not switch ours back
            ours.load_state_dict(copy.deepcopy(loop.state_dict()))  # a copy: a live state dict shares tensors
            assert all(g["foreach"] for g in ours.param_groups)
        for p, q in zip(mine, twin, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        loop.step()
    assert all(torch.equal(p, q) for p, q in zip(mine, twin, strict=True))


def _grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g) * (i + 1) for i, s in enumerate([(16, 12), (12, 10), (6, 9), (12, 12), (7,), (1,)])
    ]


def test_foreach_norm_equals_the_loop_and_clipping_scales_alike():
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(3)]
    for p, g in zip(ps, _grads(3), strict=True):
        p.grad = g.clone()
    ps[1].tensor_parallel_dim = 1  # sharded and replicated sums kept apart
    want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads(3)]))
    loop, fe = global_grad_norm(ps, foreach=False), global_grad_norm(ps, foreach=True)
    torch.testing.assert_close(loop, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(fe, want, rtol=1e-6, atol=0)
    assert torch.equal(global_grad_norm(ps), loop)  # CPU default: the loop
    norm = clip_grad_norm_(ps, 1.0)
    coef = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
    assert all(torch.equal(p.grad, g.mul_(coef)) for p, g in zip(ps, _grads(3), strict=True))


# ------------------------------------------------------------------------------------------------ 2 gloo ranks
SPLITS = [8, 4, 4]


def _full_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=g) for s in [(16, 12), (12, 10), (6, 9), (12, 12)]]


def _shard(t: torch.Tensor, i: int, r: int, tp: int) -> torch.Tensor:
    """Tensor ``i`` of :func:`_full_params` as TP rank ``r`` holds it: 0 column-parallel q/k/v (row blocks), 1
    row-parallel, 2 and 3 replicated."""
    if tp == 1 or i > 1:
        return t.clone()
    if i == 0:
        return torch.cat([b.chunk(tp)[r] for b in t.split(SPLITS)])
    return t.chunk(tp, dim=1)[r].clone()


def _muon(params: list[torch.Tensor], tp: int) -> Muon:
    groups = [{"params": params[:1], "splits": [n // tp for n in SPLITS]}, {"params": params[1:]}]
    return Muon(groups, lr=0.02, batched=True)


def _rank_worker(rank: int, world: int) -> dict:
    from megatron_dual.parallel.state import ParallelState

    out = {}
    for tp in (1, 2):  # DP 2 (two owners) | TP 2 (shards gathered, one owner)
        par = ParallelState(world, rank, tp=tp)
        params = [torch.nn.Parameter(_shard(t, i, par.tp_rank, tp)) for i, t in enumerate(_full_params())]
        for i, p in enumerate(params[:2]):
            if tp > 1:
                p.tensor_parallel_dim = i
                p.tensor_parallel_splits = SPLITS if i == 0 else None
        opt = _muon(params, tp).distribute(par)
        for step in range(2):
            for i, (p, g) in enumerate(zip(params, _grads(10 + step), strict=False)):
                p.grad = _shard(g, i, par.tp_rank, tp)
            norms = (global_grad_norm(params, par, foreach=False), global_grad_norm(params, par, foreach=True))
            opt.step()
        out[tp] = {"params": [p.detach().clone() for p in params], "norms": norms}
    return out


def test_distributed_batched_muon_and_tp_norms_equal_one_process():
    params = [torch.nn.Parameter(t) for t in _full_params()]
    opt = _muon(params, 1)
    for step in range(2):
        for p, g in zip(params, _grads(10 + step), strict=False):
            p.grad = g.clone()
        want_norm = global_grad_norm(params, foreach=False)
        opt.step()
    results = run_distributed(_rank_worker, 2)
    for rank, res in enumerate(results):
        for tp in (1, 2):
            for i, (got, full) in enumerate(zip(res[tp]["params"], params, strict=True)):
                want = _shard(full.detach(), i, rank if tp > 1 else 0, tp)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=lambda s, i=i, tp=tp: f"{tp} {i}: {s}")
            for n in res[tp]["norms"]:
                torch.testing.assert_close(n, want_norm, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(results[0][1]["params"], results[1][1]["params"], strict=True))


# ------------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_batched_bf16_fused_adamw_foreach_norms():
    """On CUDA: Newton-Schulz batched in bf16 by default and within bf16 rounding of the per-block path at
    dual-470m block shapes; AdamW fused, close to the loop, resumable from a CPU run's state (step counts moved
    to the device); foreach norms equal the loop to fp32 rounding."""
    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(1024, 1024)] * 3 + [(3584, 1024)] * 2 + [(1024, 3584)]
    srcs = [torch.randn(s, device="cuda", generator=g) for s in shapes]
    outs = {}
    for batched in (False, True):
        dsts = [torch.empty_like(s) for s in srcs]
        orthogonalise_blocks([(s, d, 1.0, 5) for s, d in zip(srcs, dsts, strict=True)], batched)
        outs[batched] = dsts
    for ref, got in zip(outs[False], outs[True], strict=True):
        assert (got - ref).norm() / ref.norm() < 2e-2  # both bf16; they differ by bf16 rounding only

    model, ocfg = _tiny_model()
    model.cuda()
    opts = build_optimizers(model, ocfg)
    assert all(gr["fused"] for gr in opts["adamw"].param_groups) and opts["muon"].batched is None
    cpu_model, _ = _tiny_model()
    cpu_adamw = build_optimizers(cpu_model, ocfg)["adamw"]
    params = [p for gr in opts["adamw"].param_groups for p in gr["params"]]
    for p, q in zip(params, [p for gr in cpu_adamw.param_groups for p in gr["params"]], strict=True):
        q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
        p.grad = q.grad.cuda()
    cpu_adamw.step()
    opts["adamw"].load_state_dict(copy.deepcopy(cpu_adamw.state_dict()))
    assert all(gr["fused"] for gr in opts["adamw"].param_groups)
    assert all(s["step"].is_cuda for s in opts["adamw"].state.values())
    opts["adamw"].step()
    cpu_adamw.step()
    for p, q in zip(params, [p for gr in cpu_adamw.param_groups for p in gr["params"]], strict=True):
        torch.testing.assert_close(p.cpu(), q, atol=1e-6, rtol=1e-5)
    norms = [global_grad_norm(params, foreach=f) for f in (False, True, None)]
    torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    assert torch.equal(norms[2], norms[1])


@pytest.mark.parametrize("batched", [False, True])
def test_zero_size_block_is_left_empty(batched):
    """A block without elements (a shard of nothing) is passed over by either path, next to a real one."""
    src, dst = torch.randn(4, 6), torch.zeros(4, 6)
    empty = torch.zeros(0, 6)
    orthogonalise_blocks([(empty, empty.clone(), 1.0, 5), (src, dst, 1.0, 5)], batched)
    assert dst.abs().sum() > 0
