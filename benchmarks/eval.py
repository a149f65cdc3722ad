#!/usr/bin/env python
"""Evaluation throughput: examples/s of ``megatron-dual eval``'s scorer per mode and task, one run, against the
naive scorer it replaces.

    python benchmarks/eval.py --checkpoint demo_out/run --limit 16 --threads 2

Ours: :class:`megatron_dual.eval.scoring.Scorer` (length-sorted batches of ``--batch-tokens`` padded tokens; causal
and prefix run each question's context once and reuse its KV cache for every choice; MNTP batches the masked copies,
the head only on the positions read). The peer: the straightforward harness loop, one forward per choice (causal,
prefix) or per masked copy (MNTP) with full logits, batch of one, no reuse, on the same examples; both must give the
same log-likelihoods (checked to 1e-3). Wall and CPU seconds are both reported: on a shared machine the CPU time of
this process is the steadier figure. Without ``--checkpoint`` the model is a
random-initialised ``tiny`` preset with the vendored 51,200-token ltg tokenizer (the dual-470m vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_dual.eval import TASKS, Scorer  # noqa: E402
from megatron_dual.eval.harness import example_requests, subsample  # noqa: E402
from megatron_dual.model import AttentionMask, DualTransformer  # noqa: E402


def load(checkpoint: str | None) -> tuple[DualTransformer, object, str]:
    if checkpoint:
        from megatron_dual.inference.loading import load_model

        model, _, tok = load_model(checkpoint)
        return model, tok, checkpoint
    from megatron_dual.config import load_config
    from megatron_dual.data.tokenizer import load_tokenizer

    tok = load_tokenizer("ltg")
    cfg = load_config(preset="tiny", overrides=[f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    return DualTransformer(cfg.model).eval(), tok, "random tiny preset, ltg tokenizer"


@torch.inference_mode()
def naive_score(model: DualTransformer, ctx: list[int], cont: list[int], mode: str, mask_id: int) -> float:
    """One full forward per choice (or per MNTP copy), full logits: what the scorer replaces."""
    seq = ctx + cont
    if mode != "mntp":
        kind = AttentionMask("prefix", prefix_len=torch.tensor([len(ctx)])) if mode == "prefix" else None
        lp = model.logits(torch.tensor([seq]), kind or AttentionMask("causal"))[0].log_softmax(-1)
        return sum(float(lp[j - 1, seq[j]]) for j in range(len(ctx), len(seq)))
    total = 0.0
    for k in range(len(cont)):
        p = len(ctx) + k
        masked = seq[:p] + [mask_id] * (len(seq) - p)
        lp = model.logits(torch.tensor([masked]), AttentionMask("bidirectional"))[0, p - 1].log_softmax(-1)
        total += float(lp[cont[k]])
    return total


def timed(fn) -> tuple[object, float, float]:
    """fn()'s result, wall seconds, CPU seconds of this process (less sensitive to other jobs on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_task(model, tok, task: str, mode: str, limit: int, batch_tokens: int | None) -> dict:
    from megatron_dual.eval.scoring import fit_window

    examples = subsample(TASKS[task].load(), limit)
    reqs = [r for ex in examples for r in example_requests(tok, ex)]
    scorer = Scorer(model, tok.mask_id, batch_tokens=batch_tokens)
    scores, wall, cpu = timed(lambda: scorer.score(reqs, mode))
    fitted = [fit_window(c, k, model.cfg.max_seq_len) for c, k in reqs]
    peer, peer_wall, peer_cpu = timed(lambda: [naive_score(model, c, k, mode, tok.mask_id) for c, k in fitted])
    worst = max(abs(a - b.logprob) for a, b in zip(peer, scores, strict=True))
    if worst > 1e-3:
        raise SystemExit(f"{task} [{mode}]: ours and the naive scorer differ by {worst:.2e}")
    n = len(examples)
    return {"task": task, "mode": mode, "examples": n, "choices": len(reqs), "batch_tokens": scorer.batch_tokens,
            "wall_s": wall, "cpu_s": cpu, "examples_per_s": n / wall, "examples_per_cpu_s": n / cpu,
            "peer_wall_s": peer_wall, "peer_cpu_s": peer_cpu, "speedup_wall": peer_wall / wall,
            "speedup_cpu": peer_cpu / cpu, "max_abs_diff": worst}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint or run directory (default: random tiny preset)")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,agreement")
    ap.add_argument("--modes", default="causal,prefix,mntp")
    ap.add_argument("--limit", type=int, default=16, help="examples per task (evenly spaced)")
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: the scorer's (2048 on CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, what = load(args.checkpoint)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: {what} ({params / 1e6:.1f}M parameters, max_seq_len {model.cfg.max_seq_len}); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'mode':>6} {'task':>10} {'ex':>4} {'wall s':>7} {'ex/s':>7} {'ex/cpu-s':>8} {'naive ex/s':>10} "
        f"{'naive ex/cpu-s':>14} {'wall x':>6} {'cpu x':>6}"
    )
    rows = []
    for mode in args.modes.split(","):  # warm-up: first calls allocate and pick kernels
        Scorer(model, tok.mask_id).score([([tok.bos_id, 20, 21], [22, 23])] * 4, mode)
    for mode in args.modes.split(","):
        for task in args.tasks.split(","):
            r = bench_task(model, tok, task, mode, args.limit, args.batch_tokens)
            rows.append(r)
            n = r["examples"]
            print(
                f"{mode:>6} {task:>10} {n:>4} {r['wall_s']:>7.2f} {r['examples_per_s']:>7.1f} "
                f"{r['examples_per_cpu_s']:>8.1f} {n / r['peer_wall_s']:>10.1f} {n / r['peer_cpu_s']:>14.1f} "
                f"{r['speedup_wall']:>5.2f}x {r['speedup_cpu']:>5.2f}x",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"model": what, "params": params, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
