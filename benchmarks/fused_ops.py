"""Fused Triton ops against the plain PyTorch code they replace: time and peak memory of forward + backward.

What it measures, per op, in one run on one GPU (bf16 inputs, fp32 parameters as in autocast training):

- ``rmsnorm``:  (tokens, hidden) RMSNorm with a learnable scale vs ``torch.nn.functional.rms_norm``;
- ``add_norm``: residual add + RMSNorm in one kernel (fp32 residual stream, bf16 sublayer output, bf16 norm
  output) vs ``x + d`` then ``F.rms_norm`` in fp32 and the cast to bf16 that the next linear does today;
- ``rotary``:   in-place rotation of the q and k heads of a fused (tokens, (Hq + 2 Hkv) D) projection vs
  split + ``megatron_dual.model.rope.apply_rotary`` on q and k;
- ``swiglu``:   ``up * silu(gate)`` of (tokens, 2 I) vs the two-op PyTorch expression;
- ``linear_ce``: output linear (+ bias) + cross-entropy + z-loss over (tokens, hidden) features and a (vocab,
  hidden) weight with 1/t-style token weights vs the unfused path (``F.linear`` under autocast, logits upcast to
  fp32, logsumexp, gather), i.e. what ``labelled_loss`` does without the kernel;
- ``ce_vs_prev``: ``linear_ce``'s fused kernel against itself as before issue 14 part 5 (in the "unfused" columns):
  dW as a bf16 product upcast and added, db as a separate column-sum pass (now: dW in the GEMM's fp32 output where
  torch has ``addmm(out_dtype=)``, db folded into the gradient kernel);
- ``ce_nogather``: ``labelled_loss`` through the GELU head with the fused kernel on (B, 2048) AR-style positions
  (one unlabelled per 500-token document) without a gather (the host-known labelled count is >= 90%) against the
  gather of the labelled rows before the head (in the "unfused" columns);
- ``rmsnorm_apex``: NVIDIA apex's FusedRMSNorm (``model.fused_ops=apex``) vs ``F.rms_norm``, a peer of our kernel;
- ``adamw_apex``: one step of apex's FusedAdam (``optimizer.adamw_impl=apex``) vs PyTorch's AdamW over
  dual-470m-sized AdamW parameters (embeddings + head: 2 x vocab x hidden), time only.
  Both are skipped with a notice where apex (built from source, docker/Dockerfile.cuda) is absent.

Time: ``triton.testing.do_bench`` median of forward + ``torch.autograd.grad`` w.r.t. every input. Memory: peak
``torch.cuda.max_memory_allocated`` during one forward + backward above what was allocated before (inputs
excluded). Ratios: ``speedup`` = unfused time / fused time (> 1: fused is faster); ``mem`` = fused peak / unfused
peak (issue 6's goal for linear_ce: <= 0.25).

    python benchmarks/fused_ops.py                 # dual-470m shapes: 16,384 tokens, hidden 1024, SwiGLU 3554,
                                                   # 16 heads x 64, vocab 51,200; needs a GPU
    python benchmarks/fused_ops.py --smoke         # no GPU: tiny shapes in the Triton interpreter, correctness only
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

OPS = ("rmsnorm", "add_norm", "rotary", "swiglu", "linear_ce")  # our kernels (benchmarks/gpu_validate.py runs these)
CE_OPS = ("ce_vs_prev", "ce_nogather")  # the fused CE's new paths against its old ones (this script only)
APEX_OPS = ("rmsnorm_apex", "adamw_apex")  # NVIDIA apex as peers, where installed


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call (micro-batch 8 x 2048)")
    p.add_argument("--ce-tokens", type=int, default=16384, help="labelled positions for linear_ce")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3554)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--ops", nargs="+", default=[*OPS, *CE_OPS, *APEX_OPS], choices=[*OPS, *CE_OPS, *APEX_OPS])
    p.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes under TRITON_INTERPRET=1")
    return p.parse_args()


Built = tuple[Callable, Callable, list]


def _leaf_maker(g: Any, device: str, dtype: Any) -> Callable[..., Any]:
    """``rnd(*shape, scale=, dt=)``: a fresh random leaf tensor (from ``g``) on ``device`` that requires grad."""
    import torch

    def rnd(*shape: int, scale: float = 1.0, dt: Any = dtype) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dt).requires_grad_(True)

    return rnd


def _build_rmsnorm_apex(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch

    return _apex_rmsnorm(rnd(a.tokens, a.hidden), rnd(a.hidden, dt=torch.float32))


def _build_rmsnorm(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch
    import torch.nn.functional as F

    from megatron_dual.kernels.rmsnorm import rms_norm

    n, h = a.tokens, a.hidden
    x, w = rnd(n, h), rnd(h, dt=torch.float32)
    return (lambda: rms_norm(x, w, 1e-7)), (lambda: F.rms_norm(x, (h,), w, 1e-7)), [x, w]


def _build_add_rmsnorm(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch
    import torch.nn.functional as F

    from megatron_dual.kernels.rmsnorm import add_rms_norm

    n, h = a.tokens, a.hidden
    x, d, w = rnd(n, h, dt=torch.float32), rnd(n, h), rnd(h, dt=torch.float32)  # fp32 stream, low-precision delta

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        xo = x + d
        return xo, F.rms_norm(xo, (h,), w, 1e-7).to(d.dtype)

    return (lambda: add_rms_norm(x, d, w, 1e-7, d.dtype)), unfused, [x, d, w]


def _build_swiglu(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch
    import torch.nn.functional as F

    from megatron_dual.kernels.swiglu import swiglu

    x = rnd(a.tokens, 2 * a.intermediate)

    def unfused() -> torch.Tensor:
        up, gate = x.chunk(2, dim=-1)
        return up * F.silu(gate)

    return (lambda: swiglu(x)), unfused, [x]


def _build_rotary(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch

    from megatron_dual.kernels.rotary import rotary_qkv_
    from megatron_dual.model.rope import RotaryEmbedding, apply_rotary

    n = a.tokens
    hq, hkv, d = a.heads, a.kv_heads or a.heads, a.head_dim
    seq = min(2048, n)
    b = max(1, n // seq)
    base = rnd(b, seq, (hq + 2 * hkv) * d)
    cos, sin = RotaryEmbedding(d, seq, 160_000.0).to(device).cos_sin(torch.arange(seq, device=device))

    def fused() -> tuple[torch.Tensor, ...]:
        qkv = base.clone()  # stands for the projection's output (a fresh non-leaf); the same clone below
        heads = rotary_qkv_(qkv, cos, sin, hq + hkv, d).view(b, seq, hq + 2 * hkv, d)
        return tuple(x.transpose(1, 2) for x in heads.split([hq, hkv, hkv], dim=2))

    def unfused() -> tuple[torch.Tensor, ...]:
        q, k, v = base.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rotary(q.view(b, seq, hq, d).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(b, seq, hkv, d).transpose(1, 2), cos, sin)
        return q, k, v.view(b, seq, hkv, d).transpose(1, 2)

    return fused, unfused, [base]


def _build_linear_ce(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import torch
    import torch.nn.functional as F

    from megatron_dual.kernels.cross_entropy import fused_linear_cross_entropy

    h, nc, v = a.hidden, a.ce_tokens, a.vocab
    feats = rnd(nc, h)
    w = rnd(v, h, scale=(2.0 / (h + v)) ** 0.5, dt=torch.float32)
    bias = rnd(v, scale=0.0, dt=torch.float32)
    y = torch.randint(0, v, (nc,), generator=g).to(device)
    tw = (1.0 / torch.rand(nc, generator=g).clamp_min(1e-3)).to(device)
    autocast = device == "cuda"

    def fused() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return fused_linear_cross_entropy(feats, w, bias, y, tw, z_loss=1e-4).weighted

    def unfused() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            logits = F.linear(feats, w, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(1, y[:, None]).squeeze(1)
        return (tw * (nll + 1e-4 * lse.square())).sum()

    return fused, unfused, [feats, w, bias]


def _build_ce_vs_prev(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    from megatron_dual.kernels.cross_entropy import previous_grad_path

    fused, _, inputs = _build_linear_ce(a, device, g, rnd)

    def previous() -> Any:
        with previous_grad_path():
            return fused()

    return fused, previous, inputs


def _build_ce_nogather(a: argparse.Namespace, device: str, g: Any, rnd: Callable[..., Any]) -> Built:
    import math

    import torch

    from megatron_dual.model import loss
    from megatron_dual.model.head import LMHead

    t = min(2048, a.ce_tokens)
    b, doc = max(1, a.ce_tokens // t), min(500, max(2, t // 3))
    head = LMHead(a.hidden, a.vocab, 1e-6, fused_ops="auto" if device == "cuda" else "triton").to(device)
    head.reset_parameters()
    hidden = rnd(b, t, a.hidden)
    labels = torch.randint(0, a.vocab, (b, t), generator=g)
    labels[:, doc - 1 :: doc] = loss.IGNORE  # the last position of each document predicts nothing
    n_labelled = int((labels != loss.IGNORE).sum())
    labels = labels.to(device)
    weights = (labels != loss.IGNORE).float()

    def run() -> Any:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return loss.labelled_loss(head, hidden, labels, weights, 1e-4, n_labelled=n_labelled).weighted

    def gathered() -> Any:
        saved, loss.ALL_ROWS_FRACTION = loss.ALL_ROWS_FRACTION, math.inf
        try:
            return run()
        finally:
            loss.ALL_ROWS_FRACTION = saved

    return run, gathered, [hidden, *head.parameters()]


BUILDERS: dict[str, Callable[[argparse.Namespace, str, Any, Callable[..., Any]], Built]] = {
    "rmsnorm_apex": _build_rmsnorm_apex,
    "rmsnorm": _build_rmsnorm,
    "add_norm": _build_add_rmsnorm,
    "rotary": _build_rotary,
    "swiglu": _build_swiglu,
    "linear_ce": _build_linear_ce,
    "ce_vs_prev": _build_ce_vs_prev,
    "ce_nogather": _build_ce_nogather,
}


def build(op: str, a: argparse.Namespace, device: str, dtype: Any) -> Built:
    """(fused fn, unfused fn, inputs that need grads) for ``op``."""
    import torch

    if op not in BUILDERS:
        raise ValueError(op)
    g = torch.Generator().manual_seed(0)
    return BUILDERS[op](a, device, g, _leaf_maker(g, device, dtype))


def _apex_rmsnorm(x: Any, w: Any) -> tuple[Callable, Callable, list]:
    import torch.nn.functional as F
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    h = x.shape[-1]
    return (lambda: fused_rms_norm_affine(x, w, (h,), 1e-7)), (lambda: F.rms_norm(x, (h,), w, 1e-7)), [x, w]


def adamw_apex(a: argparse.Namespace) -> None:
    """One optimizer step, apex FusedAdam vs PyTorch AdamW (foreach, as fast as PyTorch gets), same parameters."""
    import torch
    from apex.optimizers import FusedAdam
    from triton.testing import do_bench

    def params() -> list:
        g = torch.Generator(device="cuda").manual_seed(0)
        ps = [torch.randn(a.vocab, a.hidden, device="cuda", generator=g).requires_grad_(True) for _ in range(2)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    fused, plain = FusedAdam(params(), lr=1e-3, adam_w_mode=True), torch.optim.AdamW(params(), lr=1e-3)
    tf, tu = do_bench(fused.step), do_bench(plain.step)
    print(f"{'adamw_apex':<11} {tf:>9.3f} {tu:>10.3f} {tu / tf:>7.2f}x {'-':>10} {'-':>11} {'-':>6} {'-':>11}")


def _apex_missing(op: str) -> bool:
    import importlib.util

    try:
        missing = importlib.util.find_spec("apex.normalization") is None
    except ImportError:
        missing = True
    if missing:
        print(f"{op:<10} skipped: NVIDIA apex is not installed (docker/Dockerfile.cuda builds it from source)")
    return missing


def fwd_bwd(fn: Callable, inputs: list) -> Callable[[], Any]:
    import torch

    def run() -> Any:
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        gos = [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, inputs, gos, allow_unused=True)

    return run


def peak_bytes(run: Callable[[], Any]) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    res = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del res
    return peak


def max_err(a: Any, b: Any) -> float:

    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(
        float((x.detach().float() - y.detach().float()).abs().max()) / max(1.0, float(y.detach().float().abs().max()))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and x.numel()
    )


def main() -> int:
    a = parse()
    if a.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not a.smoke and not torch.cuda.is_available():
        print(
            "benchmarks/fused_ops.py needs a CUDA GPU (times and peak memory of the compiled kernels); none is "
            "visible here. Run `python benchmarks/fused_ops.py --smoke` for a CPU correctness pass in the Triton "
            "interpreter.",
            file=sys.stderr,
        )
        return 2
    if a.smoke:
        a.tokens, a.ce_tokens, a.hidden, a.intermediate, a.vocab = 66, 37, 100, 172, 300
        a.heads, a.kv_heads, a.head_dim = 2, 1, 50
    device = "cuda" if (torch.cuda.is_available() and not a.smoke) else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (timings not meaningful)"
    print(
        f"device: {where}; tokens {a.tokens}, hidden {a.hidden}, SwiGLU {a.intermediate}, "
        f"heads {a.heads}x{a.head_dim}, vocab {a.vocab}, CE tokens {a.ce_tokens}; inputs {dtype}"
    )
    header = (
        f"{'op':<11} {'fused ms':>9} {'unfused ms':>10} {'speedup':>8} {'fused MiB':>10} {'unfused MiB':>11} "
        f"{'mem':>6} {'max rel err':>11}"
    )
    print(header)
    print("-" * len(header))
    for op in a.ops:
        if op in APEX_OPS and (_apex_missing(op) or device != "cuda"):
            continue
        if op == "adamw_apex":
            adamw_apex(a)
            continue
        fused, unfused, inputs = build(op, a, device, dtype)
        rf, ru = fwd_bwd(fused, inputs), fwd_bwd(unfused, inputs)
        out_f, out_u = fused(), unfused()
        err = max(max_err(out_f, out_u), max_err(rf(), ru()))
        if device == "cuda":
            from triton.testing import do_bench

            tf, tu = do_bench(rf), do_bench(ru)
            mf, mu = peak_bytes(rf), peak_bytes(ru)
            print(
                f"{op:<11} {tf:>9.3f} {tu:>10.3f} {tu / tf:>7.2f}x {mf / 2**20:>10.1f} {mu / 2**20:>11.1f} "
                f"{mf / mu:>6.3f} {err:>11.2e}"
            )
        else:
            print(f"{op:<11} {'-':>9} {'-':>10} {'-':>8} {'-':>10} {'-':>11} {'-':>6} {err:>11.2e}")
    if device == "cuda":
        print("speedup = unfused / fused time (fwd+bwd); mem = fused / unfused peak (goal for linear_ce <= 0.25)")
        print("ce_vs_prev, ce_nogather: the 'unfused' columns are the fused CE's previous path (see the docstring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
