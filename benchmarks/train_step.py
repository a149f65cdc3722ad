"""dual-470m training-step throughput and MFU: AR vs MD micro-batches, fused ops vs unfused PyTorch, in one run.

What it measures: the ``dual-470m`` preset on one GPU under bf16 autocast, micro-batch ``--micro-batch`` x
``--seq-len`` tokens of synthetic packed data (random tokens, documents of random length around ``--mean-doc``, the
trainer's own AR and MD batch builders, so the MD batch has its 1/t weights and masked labels), for each of
``fused_ops`` in (triton, none) and objective in (AR, MD):

- ``micro ms``: one micro-batch forward + ``labelled_loss`` + backward (median of ``--iters`` after warm-up); the
  fused setting runs them as the DDP engine does in bf16: in one autocast region (weights cast once per step)
  with the trunk's weight gradients accumulated in fp32 by the linears (``megatron_dual.model.precision``);
- ``opt ms``:   one optimizer step of the preset's Muon + AdamW (measured once per fused setting);
- ``step s``:   ``--grad-accum`` micro-batches + one optimizer step (default 64 slots: 1M tokens per step);
- ``MFU``:      model FLOPs the step executes (``megatron_dual.model.flops.objective_batch_flops``: attention
  pairs as each mask allows them, documents included, MD bidirectional; the head at labelled positions only)
  divided by step time and the GPU's dense bf16 peak by exact device name (``flops.peak_flops``, or
  ``--peak-tflops``).

Ratios printed: MD / AR step time per setting (issue 6's goal: within 5%), and unfused / fused step time.
Issue 6's goal: >= 50% MFU for the fused AR step.

    python benchmarks/train_step.py                       # needs a GPU (about 20 GiB at micro-batch 8 x 2048)
    python benchmarks/train_step.py --smoke               # CPU: a tiny model in the Triton interpreter, checks that
                                                          # fused and unfused steps give the same loss (no timing)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="dual-470m")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=64, help="micro-batches per optimizer step for 'step s'")
    p.add_argument("--mean-doc", type=int, default=1024, help="mean document length of the synthetic packing")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fused", nargs="+", default=["triton", "none"], choices=["triton", "none"])
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny model under TRITON_INTERPRET=1")
    return p.parse_args()


def synthetic_batches(cfg: Any, mb: int, seq: int, mean_doc: int, device: str) -> dict[str, Any]:
    import torch

    from megatron_dual.objectives import AR, MD, ar_batch, md_batch

    g = torch.Generator().manual_seed(0)
    o = cfg.objective
    tokens = torch.randint(o.n_special, cfg.model.vocab_size, (mb, seq + 1), generator=g)
    doc_ids = torch.zeros(mb, seq + 1, dtype=torch.long)
    for row in range(mb):
        pos, doc = 0, 0
        while pos < seq + 1:
            n = int(torch.randint(mean_doc // 2, 3 * mean_doc // 2 + 1, (1,), generator=g))
            doc_ids[row, pos : pos + n] = doc
            tokens[row, pos] = 1  # <s> opens every document
            pos, doc = pos + n, doc + 1
    ar = ar_batch(tokens, doc_ids).to(device)
    md = md_batch(tokens, doc_ids, g, mask_token_id=o.mask_token_id, n_special=o.n_special, t_min=o.t_min).to(device)
    return {AR: ar, MD: md}


SMOKE_OVERRIDES = [
    "model.hidden_size=100",
    "model.n_heads=2",
    "model.vocab_size=300",
    "model.intermediate_size=172",
    "model.n_layers=2",
]


def configure(a: argparse.Namespace) -> tuple[Any, str]:
    """(config, device): the preset on the GPU, or (``--smoke``) a tiny model on the CPU with tiny shapes in ``a``."""
    from megatron_dual.config import load_config

    if a.smoke:
        cfg = load_config(preset="tiny", overrides=SMOKE_OVERRIDES)
        a.micro_batch, a.seq_len, a.mean_doc, a.iters, a.warmup, a.grad_accum = 2, 33, 12, 1, 0, 1
    else:
        cfg = load_config(preset=a.preset)
    device = "cuda" if not a.smoke else "cpu"
    return cfg, device


def device_peak(a: argparse.Namespace, device: str) -> float | None:
    """Print the device line; return the dense bf16 peak in FLOP/s (None on the CPU without ``--peak-tflops``)."""
    import torch

    from megatron_dual.model.flops import peak_flops

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter; timings not meaningful)"
    peak = a.peak_tflops * 1e12 if a.peak_tflops else (peak_flops(name) if device == "cuda" else None)
    print(
        f"device: {name}; preset {a.preset if not a.smoke else 'tiny (smoke)'}; micro-batch {a.micro_batch} x "
        f"{a.seq_len}; grad_accum {a.grad_accum}; dense bf16 peak "
        f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s"
    )
    return peak


def timed(fn: Any, device: str) -> float:
    """Wall time of ``fn()`` in seconds (synchronized on CUDA)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(
    fused: str, cfg: Any, batches: dict[str, Any], device: str, warmup: int, iters: int
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per objective: median micro-batch time and the optimizer step time; and the last loss."""
    import torch

    from megatron_dual.model.loss import labelled_loss
    from megatron_dual.model.precision import enable_fp32_grad_accumulation, step_region
    from megatron_dual.model.transformer import DualTransformer
    from megatron_dual.objectives import AR, MD
    from megatron_dual.optim.muon import build_optimizers

    cfg.model.fused_ops = fused
    torch.manual_seed(0)
    model = DualTransformer(cfg.model).to(device)
    with torch.no_grad():  # the reference init zeroes the out/down projections: give every path real work
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    optimizers = build_optimizers(model, cfg.optimizer)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    # the fused setting as the DDP engine runs it: one autocast region per step, fp32 weight-gradient accumulation
    bf16_step = fused == "triton" and device == "cuda"
    if bf16_step:
        enable_fp32_grad_accumulation(model)

    def micro(obj: str) -> float:
        b = batches[obj]
        with autocast:
            hidden = model(b.input_ids, b.mask)
            sums = labelled_loss(model.head, hidden, b.labels, b.weights, cfg.objective.z_loss, n_labelled=b.n_labelled)
        loss = sums.weighted / b.n_tokens
        loss.backward()
        return float(loss.detach())

    def opt_step() -> None:
        for opt in optimizers.values():
            opt.step()

    out: dict[str, dict[str, float]] = {}
    last: dict[str, float] = {}
    for obj in (AR, MD):
        with step_region(
            device, enabled=bf16_step
        ):  # the micro-batches of one step; the optimizer step after it (the region caches weight casts)
            for _ in range(warmup):
                micro(obj)
            times = [timed(lambda o=obj: micro(o), device) for _ in range(iters)]
            last[obj] = micro(obj)
        out[obj] = {"micro": statistics.median(times), "opt": timed(opt_step, device)}
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
    return out, last


def measure_all(
    a: argparse.Namespace, cfg: Any, batches: dict[str, Any], device: str, peak: float | None
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[tuple[str, str], float]]:
    """``measure`` every ``--fused`` setting: per (fused, objective) the times, step time and MFU; and the losses."""
    import torch

    from megatron_dual.model.flops import objective_batch_flops
    from megatron_dual.objectives import AR, MD

    results: dict[tuple[str, str], dict[str, float]] = {}
    losses: dict[tuple[str, str], float] = {}
    for fused in a.fused:
        per_obj, last = measure(fused, cfg, batches, device, a.warmup, a.iters)
        opt_t = min(r["opt"] for r in per_obj.values())
        for obj in (AR, MD):
            r = per_obj[obj]
            r["opt"] = opt_t
            r["step"] = a.grad_accum * r["micro"] + opt_t
            flops = objective_batch_flops(cfg.model, batches[obj])["total"] * a.grad_accum
            r["mfu"] = flops / r["step"] / peak if peak else float("nan")
            r["micro_mfu"] = flops / a.grad_accum / r["micro"] / peak if peak else float("nan")
            results[(fused, obj)] = r
            losses[(fused, obj)] = last[obj]
        if device == "cuda":
            torch.cuda.empty_cache()
    return results, losses


def smoke_check(losses: dict[tuple[str, str], float], fused_settings: list[str]) -> int:
    """Print each objective's losses per setting; 1 (with a FAIL line) if fused and unfused differ, else 0."""
    from megatron_dual.objectives import AR, MD

    for obj in (AR, MD):
        vals = [losses[(f, obj)] for f in fused_settings]
        print(f"{obj}: loss " + ", ".join(f"{f} {v:.6f}" for f, v in zip(fused_settings, vals, strict=True)))
        if max(vals) - min(vals) > 1e-4 * max(1.0, abs(vals[0])):
            print(f"FAIL: fused and unfused {obj} losses differ", file=sys.stderr)
            return 1
    print("smoke: fused and unfused steps agree (no timing on CPU)")
    return 0


def print_table(results: dict[tuple[str, str], dict[str, float]], fused_settings: list[str], step_tokens: int) -> None:
    """The results table, then the MD / AR and unfused / fused step-time ratios and the MFU goal."""
    from megatron_dual.objectives import AR, MD

    header = (
        f"{'fused_ops':<9} {'obj':<3} {'micro ms':>9} {'opt ms':>8} {'step s':>8} {'tok/s':>10} {'MFU':>6} "
        f"{'fwd+bwd MFU':>11}"
    )
    print(header)
    print("-" * len(header))
    for (fused, obj), r in results.items():
        print(
            f"{fused:<9} {obj:<3} {r['micro'] * 1e3:>9.1f} {r['opt'] * 1e3:>8.1f} {r['step']:>8.2f} "
            f"{step_tokens / r['step']:>10.0f} {r['mfu']:>6.1%} {r['micro_mfu']:>11.1%}"
        )
    for fused in fused_settings:
        ratio = results[(fused, MD)]["step"] / results[(fused, AR)]["step"]
        print(f"{fused}: MD / AR step time = {ratio:.3f} (goal <= 1.05)")
    if "triton" in fused_settings and "none" in fused_settings:
        for obj in (AR, MD):
            sp = results[("none", obj)]["step"] / results[("triton", obj)]["step"]
            print(f"{obj}: unfused / fused step time = {sp:.3f}")
    print("goal: fused AR step MFU >= 50% of the dense bf16 peak")


def main() -> int:
    a = parse()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print(
            "benchmarks/train_step.py needs a CUDA GPU (MFU of the dual-470m training step); none is visible "
            "here. Run `python benchmarks/train_step.py --smoke` for a CPU check that the fused and unfused steps "
            "agree.",
            file=sys.stderr,
        )
        return 2

    cfg, device = configure(a)
    batches = synthetic_batches(cfg, a.micro_batch, a.seq_len, a.mean_doc, device)
    peak = device_peak(a, device)
    results, losses = measure_all(a, cfg, batches, device, peak)
    if a.smoke:
        return smoke_check(losses, a.fused)
    print_table(results, a.fused, a.micro_batch * a.seq_len * a.grad_accum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
