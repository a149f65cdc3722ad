#!/usr/bin/env python
"""Causal generation throughput with a KV cache: ours (``megatron_dual.inference.generate``) against transformers'
``generate`` on the same model exported with ``megatron_dual.hf`` (``DLMLlamaForCausalLM``, sdpa), one run.

    python benchmarks/generate.py --layers 8 --hidden 512 --new-tokens 128 --batch 1 4

Both generate greedily with their own KV cache (ours pre-allocated, transformers' ``DynamicCache``), from the same
random-weight model in fp32 on the same device, the same prompt of ``--prompt-tokens`` ids, and exactly
``--new-tokens`` tokens per row (no eos); the generated ids are checked to be identical. Timing is wall time of the
whole call (prefill included) after one warm-up call, best of ``--repeats`` interleaved runs; tokens/s counts
generated tokens of all rows. On CPU the default is one torch thread: on a shared 2-core machine two OpenMP threads
per process spin against other processes and the timings swing by 5x either way. The vocabulary defaults to
the ltg tokenizer's 51,200 ids, so the head's output projection is the real size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_dual.config import ModelConfig  # noqa: E402
from megatron_dual.hf import export_model  # noqa: E402
from megatron_dual.inference import generate  # noqa: E402
from megatron_dual.model import DualTransformer  # noqa: E402


def build(args: argparse.Namespace) -> DualTransformer:
    cfg = ModelConfig(
        n_layers=args.layers,
        hidden_size=args.hidden,
        n_heads=args.hidden // 64,
        intermediate_size=args.hidden * 27 // 8,
        vocab_size=args.vocab,
        max_seq_len=2048,
        rope_theta=160_000.0,
        norm_eps=1e-7,
        attention_backend="sdpa",
    )
    torch.manual_seed(0)
    model = DualTransformer(cfg)
    with torch.no_grad():  # non-zero out/down projections: every layer's work reaches the logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("out" in name or "down" in name):
                p.normal_(0.0, 0.5 / p.shape[1] ** 0.5)
    return model.eval().to(args.device)


def _once(fn: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def timed_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, object, float, object]:
    """Best-of-``repeats`` wall times of ``a`` and ``b``, interleaved (a, b, a, b, ...) after one warm-up each, so
    a load change on a shared machine hits both alike."""
    a(), b()
    best_a = best_b = float("inf")
    out_a = out_b = None
    for _ in range(repeats):
        t, out_a = _once(a)
        best_a = min(best_a, t)
        t, out_b = _once(b)
        best_b = min(best_b, t)
    return best_a, out_a, best_b, out_b


def run_batch(model: DualTransformer, hf: torch.nn.Module, batch: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(16, args.vocab, (batch, args.prompt_tokens), generator=g)
    prompt[:, 0] = 1
    n = args.new_tokens

    def ours() -> list[list[int]]:
        return generate(model, prompt.to(args.device), n, temperature=0)

    def theirs() -> list[list[int]]:
        out = hf.generate(
            prompt.to(args.device),
            attention_mask=torch.ones_like(prompt).to(args.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=3,
        )
        return out[:, args.prompt_tokens :].tolist()

    with torch.no_grad():
        t_ours, ids_ours, t_hf, ids_hf = timed_pair(ours, theirs, args.repeats)
    return {
        "batch": batch,
        "ours_tok_s": batch * n / t_ours,
        "transformers_tok_s": batch * n / t_hf,
        "speedup": t_hf / t_ours,
        "same_tokens": ids_ours == ids_hf,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=51200, help="vocabulary size (51,200: the ltg tokenizer's)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on shared cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_model(model, Path(tmp) / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(out), trust_remote_code=True, dtype=torch.float32, attn_implementation="sdpa"
        )
    hf = hf.eval().to(args.device)
    rows = [run_batch(model, hf, b, args) for b in args.batch]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} ({params / 1e6:.1f}M params, fp32); "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy; device {args.device}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()} x {os.cpu_count()} cores"
    )
    print(f"{'batch':>5}  {'ours tok/s':>10}  {'transformers tok/s':>18}  {'ratio':>6}  same tokens")
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['ours_tok_s']:>10.1f}  {r['transformers_tok_s']:>18.1f}  {r['speedup']:>5.2f}x  "
            f"{r['same_tokens']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
