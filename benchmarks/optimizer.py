"""Optimizer step costs of dual-470m: Muon's Newton-Schulz per block vs batched, AdamW's implementations, grad norms.

What it measures, on one GPU, for the ``dual-470m`` preset (MLP padded to 3584, as trained; ``optimizer.muon_head``
as in the preset), every parameter given a random gradient:

- ``muon``:  one Muon step (momentum, Newton-Schulz, decay and update) with Newton-Schulz block by block
  (``batched=False``: ~40 launches per block, ~7,000 a step) vs stacked by shape (``batched=True``, the CUDA
  default: ``baddbmm`` over the 1024 x 1024 and the 1024 x 3584 blocks); ``max_rel_err``: the two orthogonalised
  updates of one step against each other (bf16 on GPU: ~1e-2 is bf16 rounding; fp32 on CPU: ~1e-6);
- ``adamw``: one AdamW step over the AdamW parameters (embedding, head, norms, biases) with ``foreach=False`` (the
  former setting) vs ``foreach=True`` vs ``fused=True`` (the CUDA default);
- ``grad_norm``: ``global_grad_norm`` over every gradient, the per-tensor loop (CPU default) vs foreach norms
  (CUDA default).

Time: ``triton.testing.do_bench`` median on CUDA; on CPU (``--smoke``) one call, paths not speed. ``speedup`` =
old / new time (> 1: the new default is faster).

    python benchmarks/optimizer.py            # dual-470m on a GPU (about 8 GiB)
    python benchmarks/optimizer.py --smoke    # CPU, a tiny model: the paths and their agreement only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

SMOKE_MODEL = [  # a tiny dual-470m: fused q/k/v, padded MLP (40 -> 48), head projection on Muon
    "model.n_layers=2",
    "model.hidden_size=32",
    "model.n_heads=2",
    "model.intermediate_size=40",
    "model.pad_intermediate_to=16",
    "model.vocab_size=300",
    "model.max_seq_len=64",
    "data.seq_len=32",
]


def model_and_optimizers(device: str, smoke: bool) -> tuple[Any, Any, dict]:
    """(config, dual-470m model on ``device`` with random gradients, its optimizers)."""
    import torch

    from megatron_dual.config import load_config
    from megatron_dual.model.transformer import DualTransformer
    from megatron_dual.optim.muon import build_optimizers

    over = SMOKE_MODEL if smoke else ["model.pad_intermediate_to=64"]
    cfg = load_config(preset="dual-470m", overrides=over)
    torch.manual_seed(0)
    with torch.device(device):
        model = DualTransformer(cfg.model)
    gen = torch.Generator(device).manual_seed(1)
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, device=device, generator=gen)
    return cfg, model, build_optimizers(model, cfg.optimizer)


def _rel_err(a: list, b: list) -> float:
    return max((x - y).abs().max().item() / max(y.abs().max().item(), 1e-30) for x, y in zip(a, b, strict=True))


def muon_rows(opt: Any, bench: Callable[[Callable], float]) -> dict:
    """Muon steps per block vs batched, and how far their orthogonalised updates of one step differ."""
    from megatron_dual.optim.muon import logical_blocks

    jobs = []
    for group in opt.param_groups:
        for p in group["params"]:
            splits = group["splits"] or [p.shape[0]]
            jobs.append((p.grad, splits, group, logical_blocks(p, splits, p.shape[1])))
    outs, times = {}, {}
    for batched in (False, True):
        opt.batched = batched
        outs[batched] = opt.orthogonalised(jobs)
        times[batched] = bench(opt.step)
    opt.batched = None
    n_blocks = sum(len(j[1]) for j in jobs)
    return dict(
        name="muon",
        blocks=n_blocks,
        per_block_ms=times[False],
        batched_ms=times[True],
        speedup=times[False] / times[True],
        max_rel_err=_rel_err(outs[True], outs[False]),
    )


def adamw_rows(opt: Any, device: str, bench: Callable[[Callable], float]) -> dict:
    """One AdamW step: single-tensor loop vs foreach vs fused, each from the same state; their parameters after
    one step compared with the loop's."""
    import torch

    variants = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    after, times = {}, {}
    for label, impl in variants.items():
        groups = []
        for g in opt.param_groups:
            params = [torch.nn.Parameter(p.detach().clone()) for p in g["params"]]
            for q, p in zip(params, g["params"], strict=True):
                q.grad = p.grad
            groups.append({"params": params, "weight_decay": g["weight_decay"]})
        d = opt.defaults
        twin = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], **impl)
        twin.step()
        after[label] = [p.detach().clone() for g in groups for p in g["params"]]
        times[label] = bench(twin.step)
        del twin, groups
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return dict(
        name="adamw",
        params=n,
        loop_ms=times["loop"],
        foreach_ms=times["foreach"],
        fused_ms=times["fused"],
        speedup_foreach=times["loop"] / times["foreach"],
        speedup_fused=times["loop"] / times["fused"],
        max_rel_err_foreach=_rel_err(after["foreach"], after["loop"]),
        max_rel_err_fused=_rel_err(after["fused"], after["loop"]),
        default="fused" if device == "cuda" else "foreach",
    )


def norm_rows(model: Any, bench: Callable[[Callable], float]) -> dict:
    from megatron_dual.engine.ddp import global_grad_norm

    params = list(model.parameters())
    loop, fe = global_grad_norm(params, foreach=False), global_grad_norm(params, foreach=True)
    t_loop = bench(lambda: global_grad_norm(params, foreach=False))
    t_fe = bench(lambda: global_grad_norm(params, foreach=True))
    return dict(
        name="grad_norm",
        tensors=len(params),
        loop_ms=t_loop,
        foreach_ms=t_fe,
        speedup=t_loop / t_fe,
        rel_diff=abs(fe.item() - loop.item()) / loop.item(),
    )


def rows(
    device: str, smoke: bool, bench: Callable[[Callable], float], enough: Callable[[str], bool] = lambda _: True
) -> Iterator[dict]:
    """The measurements, one dict each (``enough(name)`` False skips a measurement: gpu_validate's budget)."""
    _, model, opts = model_and_optimizers(device, smoke)
    if enough("muon"):
        yield muon_rows(opts["muon"], bench)
    if enough("adamw"):
        yield adamw_rows(opts["adamw"], device, bench)
    if enough("grad_norm"):
        yield norm_rows(model, bench)


def bench_fn(device: str, smoke: bool) -> Callable[[Callable], float]:
    """Milliseconds of a call: do_bench's median on CUDA, one host-timed call otherwise."""

    def host(fn: Callable) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    if device != "cuda" or smoke:
        return host
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny model: paths and agreement, no timing")
    a = p.parse_args(argv)
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print("benchmarks/optimizer.py needs a CUDA GPU; `--smoke` runs its paths on CPU", file=sys.stderr)
        return 2
    device = "cpu" if a.smoke else "cuda"
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (timings not meaningful)"
    print(f"device: {where}; model: {'tiny' if a.smoke else 'dual-470m, MLP padded to 3584'}")
    for row in rows(device, a.smoke, bench_fn(device, a.smoke)):
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
