"""Attention forward+backward throughput: our Triton kernel against SDPA, FlexAttention and flash-attn.

What it measures: for each mask and sequence length L, the wall time of one forward and one backward pass
(``torch.autograd.grad`` of the output against a fixed random upstream gradient, so no gradient accumulation) of
attention on bf16 q, k, v of shape (B, H, L, D) with B*L tokens fixed (default 16,384 tokens, 16 heads, D = 64),
timed with ``triton.testing.do_bench`` (median over repetitions, after warm-up and autotuning). TFLOP/s counts
only the useful work: 4*D FLOPs per (query, key) pair the mask allows in the forward, 2.5 times that in the
backward, summed over batch and heads (so a causal mask does about half the work of a bidirectional one).

Peers: ``sdpa`` is ``torch.nn.functional.scaled_dot_product_attention`` restricted to its flash backend for the
causal and bidirectional masks; for document and prefix masks SDPA's flash backend takes no mask, so the column
shows SDPA with a dense boolean mask (memory-efficient backend) and is marked ``*``. ``flex`` is FlexAttention
(``torch.compile``d) with a block mask built from the same mask. ``flash-attn`` (where installed) uses varlen
(cu_seqlens) for documents and has no prefix mask. Ratios are ours / theirs (> 1: ours is faster).

    python benchmarks/attention.py                      # L = 2048, 4096, 8192; every mask; needs a GPU
    python benchmarks/attention.py --smoke              # CPU: tiny shapes under TRITON_INTERPRET=1, correctness only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from megatron_dual.model.attention import AttentionMask

MASKS = ("causal", "bidirectional", "doc-causal", "doc-bidirectional", "prefix")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=16384, help="B * L per measurement")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA when fewer than --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--mean-doc", type=int, default=512, help="mean document length for the document masks")
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes in the Triton interpreter")
    return p.parse_args()


def make_mask(name: str, b: int, t: int, mean_doc: int, device: str, seed: int = 0) -> AttentionMask:
    import torch

    from megatron_dual.model.attention import AttentionMask

    g = torch.Generator().manual_seed(seed)
    if name in ("causal", "bidirectional"):
        return AttentionMask(name)
    if name == "prefix":  # per sequence a prompt of 1/8 to 7/8 of the length, bidirectional, then causal
        return AttentionMask("prefix", prefix_len=torch.randint(t // 8, 7 * t // 8, (b,), generator=g).to(device))
    rows = []
    for _ in range(b):  # packed documents, lengths uniform in [1, 2 * mean_doc)
        ids, doc = [], 0
        while len(ids) < t:
            ids += [doc] * int(torch.randint(1, 2 * mean_doc, (1,), generator=g))
            doc += 1
        rows.append(torch.tensor(ids[:t]))
    return AttentionMask(name.split("-")[1], doc_ids=torch.stack(rows).to(device))


def allowed_pairs(mask: AttentionMask, b: int, t: int, device: str) -> int:
    """How many (query, key) pairs the mask allows over the batch (per head)."""
    total = 0
    for start in range(0, t, 1024):  # dense mask in row chunks, to bound memory at L = 8192
        rows = min(1024, t - start)
        sub = type(mask)(mask.kind, doc_ids=mask.doc_ids, prefix_len=mask.prefix_len, q_offset=start)
        dense = sub.dense(rows, t, device)
        total += int(dense.expand(b, 1, rows, t).sum()) if dense is not None else b * rows * t
    return total


def runners(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, do: torch.Tensor, flash_attn: Any
) -> dict[str, Callable[[], object] | None]:
    """One fwd+bwd closure per peer (None where the peer cannot express the mask)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_dual.model.attention import _flex, attention, document_runs

    gqa = q.shape[1] != k.shape[1]

    def bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(), (q, k, v), do)

    out: dict[str, Callable[[], object] | None] = {}
    out["ours"] = bwd(lambda: attention(q, k, v, mask, backend="triton"))
    if mask.doc_ids is None and mask.kind != "prefix":

        def sdpa() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=mask.kind == "causal", enable_gqa=gqa)

        out["sdpa"] = bwd(sdpa)
    else:
        dense = mask.dense(q.shape[2], k.shape[2], q.device)

        def sdpa_dense() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)

        out["sdpa*"] = bwd(sdpa_dense)
    out["flex"] = bwd(lambda: _flex(q, k, v, mask))
    if flash_attn is not None and mask.kind != "prefix":
        qt, kt, vt = (x.transpose(1, 2).contiguous().detach().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        causal = mask.kind == "causal"
        if mask.doc_ids is None:
            out["flash-attn"] = lambda: torch.autograd.grad(
                flash_attn.flash_attn_func(qt, kt, vt, causal=causal), (qt, kt, vt), dot
            )
        else:
            cu, longest = document_runs(mask.doc_ids)
            b, t, h, d = qt.shape
            flat = [x.view(b * t, x.shape[2], d) for x in (qt, kt, vt)]
            out["flash-attn"] = lambda: torch.autograd.grad(
                flash_attn.flash_attn_varlen_func(*flat, cu, cu, longest, longest, causal=causal),
                flat,
                dot.view(b * t, h, d),
            )
    else:
        out["flash-attn"] = None
    return out


def gpu_main(args: argparse.Namespace) -> int:
    import torch
    import triton
    from triton.testing import do_bench

    try:
        import flash_attn
    except ImportError:
        flash_attn = None
    hkv = args.kv_heads or args.heads
    name = torch.cuda.get_device_name()
    print(
        f"device: {name}; torch {torch.__version__}, triton {triton.__version__}, flash-attn "
        f"{getattr(flash_attn, '__version__', 'not installed')}"
    )
    print(
        f"attention fwd+bwd, bf16, {args.tokens} tokens per call, {args.heads} query / {hkv} kv heads, head dim "
        f"{args.head_dim}; TFLOP/s of useful (unmasked) work; ratios = ours / peer"
    )
    cols = ["ours", "sdpa", "flex", "flash-attn"]
    print(
        f"{'mask':<18}{'L':>6}"
        + "".join(f"{c + ' TF/s':>16}" for c in cols)
        + "".join(f"{'x ' + c:>14}" for c in cols[1:])
    )
    for mask_name in args.masks:
        for t in args.lengths:
            b = max(1, args.tokens // t)
            torch.manual_seed(0)
            q = torch.randn(b, args.heads, t, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(b, hkv, t, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(b, hkv, t, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            do = torch.randn_like(q)
            mask = make_mask(mask_name, b, t, args.mean_doc, "cuda")
            flops = 4 * args.head_dim * args.heads * allowed_pairs(mask, b, t, "cuda") * 3.5
            tflops: dict[str, float | None] = {}
            for peer, fn in runners(q, k, v, mask, do, flash_attn).items():
                if fn is None:
                    tflops[peer.rstrip("*")] = None
                    continue
                try:
                    ms = do_bench(fn, warmup=25, rep=100)
                    tflops[peer.rstrip("*")] = flops / ms / 1e9
                except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                    print(f"  {peer} failed at {mask_name} L={t}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    tflops[peer.rstrip("*")] = None
            ours = tflops["ours"]

            def cell(x: float | None) -> str:
                return f"{x:16.1f}" if x else f"{'n/a':>16}"

            def ratio(x: float | None, ours: float | None = ours) -> str:
                return f"{ours / x:13.2f}x" if x and ours else f"{'n/a':>14}"

            sdpa_mark = "*" if mask_name not in ("causal", "bidirectional") else ""
            print(
                f"{mask_name + sdpa_mark:<18}{t:>6}"
                + "".join(cell(tflops.get(c)) for c in cols)
                + "".join(ratio(tflops.get(c)) for c in cols[1:]),
                flush=True,
            )
            del q, k, v, do
    print("* SDPA's flash backend takes no mask: the sdpa column is SDPA with a dense mask (memory-efficient).")
    return 0


def smoke_main(args: argparse.Namespace) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from megatron_dual.model.attention import attention, reference_attention

    print(
        "smoke mode: Triton interpreter on CPU, tiny shapes; checks that every mask runs forward and backward "
        "and matches the fp32 reference (timings here say nothing about GPU speed)"
    )
    for mask_name in args.masks:
        b, t, d = 2, 48, 16
        mask = make_mask(mask_name, b, t, 12, "cpu")
        q, k, v = (torch.randn(b, 2, t, d, requires_grad=True) for _ in range(3))
        start = time.perf_counter()
        out = attention(q, k, v, mask, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        took = time.perf_counter() - start
        ref = reference_attention(q, k, v, mask)
        ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
        err = max(float((a - r).detach().abs().max()) for a, r in zip((out, *grads), (ref, *ref_grads), strict=True))
        print(f"{mask_name:<18} L={t}: max |triton - reference| over out, dq, dk, dv = {err:.1e} ({took:.1f}s)")
        if err > 1e-3:
            return 1
    return 0


def main() -> int:
    args = parse()
    if args.smoke:
        return smoke_main(args)
    import torch

    if not torch.cuda.is_available():
        print(
            "benchmarks/attention.py measures GPU throughput and found no CUDA/ROCm device; nothing measured. "
            "Run it on a GPU, or pass --smoke for a CPU correctness run of the same code paths.",
            file=sys.stderr,
        )
        return 2
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
