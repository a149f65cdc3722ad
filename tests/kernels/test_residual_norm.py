"""The fused residual-add + RMSNorm kernel and the RMSNorm output dtype, against PyTorch references.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``); the
interpreter computes bf16 dot products wrongly, but these kernels have none, so bf16 appears here only as a dtype
the output is written in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_dual.kernels.rmsnorm import add_rms_norm, rms_norm
from megatron_dual.model.fused import RMSNorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=1e-2)}


def leaf(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_()


def reference(x, delta, w, eps, out_dtype):
    """PyTorch in fp32: the sum rounded to the residual's dtype, the norm of it rounded to ``out_dtype``."""
    xo = (x.float() + delta.float()).to(x.dtype)
    y = F.rms_norm(xo.float(), (x.shape[-1],), w.float(), eps).to(out_dtype)
    return xo, y


@pytest.mark.parametrize(
    "shape,x_dt,d_dt,out_dt",
    [
        ((3, 5, 100), torch.float32, torch.float32, torch.float32),  # fused fp32 path: one gradient tensor
        ((7, 37), torch.float32, torch.float16, torch.float16),  # autocast: fp32 residual, half delta and output
        ((2, 3, 65), torch.float16, torch.float16, torch.float16),  # half residual (DeepSpeed's half parameters)
    ],
    ids=["fp32", "fp32-residual-fp16-delta", "fp16"],
)
def test_add_rms_norm_matches_pytorch(shape, x_dt, d_dt, out_dt):
    eps = 1e-6
    x, d, w = leaf(shape, x_dt, 0), leaf(shape, d_dt, 1), leaf((shape[-1],), torch.float32, 2)
    xo, y = add_rms_norm(x, d, w, eps, out_dt)
    assert xo.dtype == x_dt and y.dtype == out_dt and xo.shape == y.shape == shape
    gxo, gy = leaf(shape, x_dt, 3).detach(), leaf(shape, out_dt, 4).detach()
    torch.autograd.backward([xo, y], [gxo, gy])
    got = [xo, y, x.grad, d.grad, w.grad]
    assert x.grad.dtype == x_dt and d.grad.dtype == d_dt
    xr, dr, wr = (t.detach().clone().requires_grad_() for t in (x, d, w))
    xo_r, y_r = reference(xr, dr, wr, eps, out_dt)
    torch.autograd.backward([xo_r.float(), y_r.float()], [gxo.float(), gy.float()])
    want = [xo_r, y_r, xr.grad, dr.grad, wr.grad]
    half = torch.float16 in (x_dt, d_dt, out_dt)
    tol = TOL[torch.float16 if half else torch.float32]
    for name, g, r in zip(["x_new", "y", "dx", "ddelta", "dw"], got, want, strict=True):
        scale = 4.0 if name == "dw" and half else 1.0  # dw sums rows of half-precision dy
        torch.testing.assert_close(
            g.float(), r.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_add_rms_norm_gradient_is_the_residual_plus_the_norm_path():
    """Only the residual output used: the gradient is passed through unchanged (zero norm gradient, zero dw)."""
    x, d, w = leaf((4, 33), torch.float32, 5), leaf((4, 33), torch.float32, 6), leaf((33,), torch.float32, 7)
    xo, _ = add_rms_norm(x, d, w, 1e-6)
    g = leaf((4, 33), torch.float32, 8).detach()
    xo.backward(g)
    torch.testing.assert_close(x.grad, g, atol=0, rtol=0)
    torch.testing.assert_close(d.grad, g, atol=0, rtol=0)
    assert float(w.grad.abs().max()) == 0.0


def test_rms_norm_out_dtype_and_autocast_module():
    """``out_dtype`` is what the kernel writes; the module passes the autocast dtype, and dx keeps x's dtype."""
    x, w = leaf((5, 48), torch.float32, 9), leaf((48,), torch.float32, 10)
    y = rms_norm(x, w, 1e-6, torch.float16)
    assert y.dtype == torch.float16
    xr = x.detach().clone().requires_grad_()
    ref = F.rms_norm(xr, (48,), w.detach(), 1e-6)
    torch.testing.assert_close(y.float(), ref, **TOL[torch.float16])
    gy = leaf((5, 48), torch.float16, 11).detach()
    y.backward(gy)
    ref.backward(gy.float())
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float16])

    norm = RMSNorm(48, 1e-6, "triton").to(DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = norm(x.detach())
    assert out.dtype == torch.bfloat16
    assert norm(x.detach()).dtype == torch.float32  # outside autocast: x's dtype, as before


# The kernels are compiled ahead of time for sm_90 / sm_80 / gfx90a with the others, in the list of
# tests/kernels/test_fused.py::test_fused_kernels_compile_for_gpus (fp32 residual stream, half delta and output).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_add_rms_norm_at_470m_shape():
    x, d, w = (
        leaf((2048, 1024), torch.float32, 12),
        leaf((2048, 1024), torch.bfloat16, 13),
        leaf((1024,), torch.float32, 14),
    )
    xo, y = add_rms_norm(x, d, w, 1e-7, torch.bfloat16)
    xo_r, y_r = reference(x, d, w, 1e-7, torch.bfloat16)
    torch.testing.assert_close(xo, xo_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.float(), y_r.float(), atol=6e-2, rtol=3e-2)
