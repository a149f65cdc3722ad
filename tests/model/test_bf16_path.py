"""The bf16 activation path: the fused residual-add + RMSNorm trunk, one autocast region per step, and fp32
weight-gradient accumulation, each against the path it replaces (on CPU: the Triton interpreter and CPU autocast).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from toy import tiny_overrides, write_random_corpus

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.kernels.matmul import fp32_out_addmm
from megatron_dual.model import AttentionMask, DualTransformer
from megatron_dual.model.checkpointing import apply_activation_checkpointing
from megatron_dual.model.loss import IGNORE, labelled_loss
from megatron_dual.model.precision import Linear, enable_fp32_grad_accumulation, step_region
from megatron_dual.trainer import Trainer

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(fused: str, n_layers: int = 2) -> ModelConfig:
    return ModelConfig(
        n_layers=n_layers,
        hidden_size=64,
        n_heads=2,
        n_kv_heads=2,
        intermediate_size=88,
        vocab_size=200,
        max_seq_len=64,
        rope_theta=10_000.0,
        fused_ops=fused,
    )


def model_pair(fused: str, seed: int = 0) -> tuple[DualTransformer, DualTransformer]:
    """A plain model with every weight non-zero (the reference init zeroes some) and a copy with ``fused``."""
    torch.manual_seed(seed)
    plain = DualTransformer(tiny("none")).to(DEV)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.1)
    other = DualTransformer(tiny(fused)).to(DEV)
    other.load_state_dict(plain.state_dict())
    return plain, other


def batch(seed: int, b: int = 1, t: int = 14) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 200, (b, t), generator=gen)
    labels = torch.randint(8, 200, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.3] = IGNORE
    return ids.to(DEV), labels.to(DEV), torch.ones(b, t, device=DEV)


def loss_of(model: DualTransformer, seed: int) -> torch.Tensor:
    ids, labels, weights = batch(seed)
    sums = labelled_loss(model.head, model(ids, AttentionMask("causal")), labels, weights, 1e-3)
    return sums.weighted / sums.count


def grad_nodes(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_fused_residual_trunk_matches_plain_blocks():
    """fused_ops = triton: every residual add but the last runs with the norm after it in one kernel, also when
    blocks are recomputed in backward (tests/kernels/test_fused.py compares the fused model without recompute)."""
    plain, fused = model_pair("triton")
    apply_activation_checkpointing(fused, "full")
    losses = []
    for model in (plain, fused):
        loss = loss_of(model, 1)
        nodes = grad_nodes(loss)
        assert ("AddRMSNormFunctionBackward" in nodes) == (model is fused), sorted(nodes)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


class WeightCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 copies of the given parameters (autocast's weight casts reach the dispatcher as these)."""

    def __init__(self, params) -> None:
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.n += args[0].data_ptr() in self.ptrs
        return func(*args, **kwargs)


def bf16_micro_batches(model: DualTransformer, region) -> tuple[int, list[torch.Tensor]]:
    """Two micro-batches (forward in CPU bf16 autocast, backward outside it) inside ``region``; casts and grads."""
    model.zero_grad(set_to_none=True)
    matrices = [p for p in model.layers.parameters() if p.dim() == 2]
    with WeightCasts(matrices) as casts, region:
        for seed in (1, 2):
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = loss_of(model, seed)
            loss.backward()
    return casts.n, [p.grad.clone() for p in model.parameters()]


def test_one_autocast_region_casts_each_weight_once_per_step():
    """Per-micro-batch autocast re-casts every weight each micro-batch; inside ``step_region`` once, with the same
    gradients (the cast values are the same), and the region's end drops the cache (the next step re-casts)."""
    _, model = model_pair("none")
    n_matrices = sum(p.dim() == 2 for p in model.layers.parameters())
    per_micro, ref = bf16_micro_batches(model, contextlib.nullcontext())
    assert per_micro == 2 * n_matrices
    once, got = bf16_micro_batches(model, step_region(DEV))
    assert once == n_matrices
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=0, rtol=0)
    again, _ = bf16_micro_batches(model, step_region(DEV))
    assert again == n_matrices


def test_trainer_enters_one_region_per_step(tmp_path):
    """The real loop with bf16 on CPU: each trunk matrix is cast once in a step of 2 micro-batches."""
    corpus = write_random_corpus(str(tmp_path / "corpus"), n_docs=20)
    cfg = load_config(
        overrides=[
            *tiny_overrides(corpus, tmp_path / "run"),
            "train.grad_accum=2",
            "objective.alpha=1/2",
            "train.precision=bf16",
        ]
    )
    tr = Trainer(cfg, quiet=True)
    assert tr.engine.precision == "bf16"
    matrices = [p for p in tr.model.layers.parameters() if p.dim() == 2]
    with WeightCasts(matrices) as casts:
        metrics = tr.train_step(tr.loader.batches(0))
    assert casts.n == len(matrices) and math.isfinite(metrics["loss"])
    tr.engine.close()


# ------------------------------------------------------------------------- fp32 weight-gradient accumulation
def bf16_steps(model: DualTransformer, seeds, buckets=None) -> list[torch.Tensor]:
    """One optimizer step's micro-batches in CPU bf16 (one region, backward outside autocast); the losses."""
    losses = []
    with step_region(DEV):
        for i, seed in enumerate(seeds):
            with torch.autocast(DEV, dtype=torch.bfloat16):
                loss = loss_of(model, seed)
            last = i == len(seeds) - 1
            with contextlib.nullcontext() if buckets is None or last else buckets.no_sync():
                loss.backward()
            losses.append(loss.detach())
    return losses


def test_fp32_weight_grad_accumulation_matches_autocast_path():
    """Tagged trunk weights: their gradients are accumulated by the linear itself into fp32 ``.grad`` (autograd
    gets none, the post-accumulate hooks still fire once per backward); losses bit-equal, gradients to bf16."""
    ref_model, model = model_pair("none")
    tagged = [p for p in model.layers.parameters() if p.dim() == 2]
    assert enable_fp32_grad_accumulation(model) == len(tagged)
    fired: dict[int, int] = {}
    for p in tagged:
        p.register_post_accumulate_grad_hook(lambda q: fired.__setitem__(id(q), fired.get(id(q), 0) + 1))
    with torch.autocast(DEV, dtype=torch.bfloat16):
        nodes = grad_nodes(loss_of(model, 1))
    assert "_Fp32GradLinearBackward" in nodes
    ref_losses, losses = bf16_steps(ref_model, (1, 2)), bf16_steps(model, (1, 2))
    assert [float(x) for x in losses] == [float(x) for x in ref_losses]  # same bf16 forward
    assert fired == {id(p): 2 for p in tagged}
    for (name, r), p in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        scale = float(r.grad.abs().max())
        torch.testing.assert_close(p.grad, r.grad, atol=1e-2 * scale, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):  # inference: the plain linear
        assert "_Fp32GradLinearBackward" not in grad_nodes(loss_of(model, 1).requires_grad_())


def test_fp32_grad_linear_cast_cache_follows_weight_version():
    """Within a region the bf16 copy of a weight is reused until the weight changes in place."""
    lin = Linear(8, 4, bias=False)
    enable_fp32_grad_accumulation(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([lin])}))
    x = torch.randn(3, 8)
    with step_region(DEV), torch.autocast(DEV, dtype=torch.bfloat16):
        y1 = lin(x)
        with torch.no_grad():
            lin.weight.mul_(2.0)
        y2 = lin(x)
    torch.testing.assert_close(y2.float(), 2 * y1.float(), atol=1e-2, rtol=1e-2)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from megatron_dual.engine.ddp import GradientBuckets
    from megatron_dual.parallel.state import ParallelState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _, model = model_pair("none")
    enable_fp32_grad_accumulation(model)
    buckets = GradientBuckets(model, ParallelState(world_size=world, rank=rank), bucket_mb=0.01)
    buckets.zero_grad()
    bf16_steps(model, (10 + rank, 20 + rank), buckets)
    launched = buckets._next  # buckets all-reduced during the backward: every parameter was marked ready
    buckets.finish_grad_sync()
    grads = {n: p.grad for n, p in model.named_parameters()}
    torch.save((launched, len(buckets.buckets), grads), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test (the GPU run has test_gpu_fp32_* instead)")
def test_fp32_grad_accumulation_ddp_two_gloo_ranks(tmp_path):
    """2 ranks x 2 micro-batches through the all-reduce buckets equal one process accumulating the 4 micro-batches,
    and every bucket was launched during the last backward (the tagged weights were marked ready)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    _, ref = model_pair("none")
    enable_fp32_grad_accumulation(ref)
    bf16_steps(ref, (10, 20, 11, 21))
    for rank in range(2):
        launched, n_buckets, grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert launched == n_buckets > 2
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_weight_grad_accumulation_with_addmm_out_dtype():
    """On CUDA the weight gradient is one fp32-output matmul accumulated in place: closer to the fp32 product of
    the same bf16 operands than the autocast path's bf16-rounded product, and two backwards add up."""
    device = torch.device("cuda", torch.cuda.current_device())
    assert fp32_out_addmm(device, torch.bfloat16), f"torch {torch.__version__}: no addmm out_dtype on CUDA (fallback)"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16()
    lin = Linear(1024, 3584, bias=False).cuda()
    enable_fp32_grad_accumulation(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([lin])}))
    dy = torch.randn(4096, 3584, device="cuda", generator=g).bfloat16()
    with step_region("cuda"):
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = lin(x)
            y.backward(dy)
    exact = 2 * dy.float().t() @ x.float()
    rounded = 2 * (dy.t() @ x).float()  # what the autocast path accumulates
    err, err_rounded = (lin.weight.grad - exact).abs().max(), (rounded - exact).abs().max()
    assert lin.weight.grad.dtype == torch.float32 and err < err_rounded, (err, err_rounded)


def _tp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from megatron_dual.parallel.tensor_parallel import parallelize_model, sync_sequence_parallel_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group([0, 1])
    grads = []
    for tag in (False, True):
        _, model = model_pair("none")
        parallelize_model(model, group, sequence_parallel=tag)  # the tagged run also under sequence parallelism
        if tag:
            assert enable_fp32_grad_accumulation(model) == 4 * len(model.layers)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                assert "_Fp32GradLinearBackward" in grad_nodes(loss_of(model, 3))
        losses = bf16_steps(model, (3, 4))
        sync_sequence_parallel_grads(model, group)  # the norms' partial gradients under sequence parallelism
        grads.append((losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.save(grads, f"{out}/tp{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test")
def test_fp32_grad_accumulation_in_tensor_parallel_layers(tmp_path):
    """TP = 2: the column/row-parallel layers take the same path; their shards' gradients equal the untagged
    layers' to bf16 tolerance (sequence parallelism on in the tagged run), losses to bf16 rounding."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_tp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        (ref_losses, ref), (losses, got) = torch.load(tmp_path / f"tp{rank}.pt")
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), atol=2e-2, rtol=1e-2)
        assert got.keys() == ref.keys()
        for name, g in ref.items():
            scale = float(g.abs().max())
            torch.testing.assert_close(got[name], g, atol=2e-2 * scale, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_fp32_grad_accumulation_with_activation_checkpointing(mode):
    """Recomputation in backward hands the linear its saved tensors back as detached recomputed copies: the
    weight gradient must still land in the parameter's own ``.grad`` (not a copy's), equal to the untagged path."""
    ref_model, model = model_pair("none")
    for m in (ref_model, model):
        apply_activation_checkpointing(m, mode)
    enable_fp32_grad_accumulation(model)
    bf16_steps(ref_model, (1, 2))
    bf16_steps(model, (1, 2))
    for (name, r), p in zip(ref_model.named_parameters(), model.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        scale = float(r.grad.abs().max())
        torch.testing.assert_close(p.grad, r.grad, atol=1e-2 * scale, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
