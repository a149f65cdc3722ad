"""NVIDIA apex as an optional peer of our kernels: ``model.fused_ops = apex`` (apex's FusedRMSNorm for every RMSNorm,
our Triton kernels for the other fused ops) and ``optimizer.adamw_impl = apex`` (apex's FusedAdam for the AdamW
part). apex is built from source in ``docker/Dockerfile.cuda``; where it is absent (or a tensor is not on CUDA) the
plain path runs after a one-line notice. The PyPI package named ``apex`` is an unrelated project: it has no
``apex.normalization``, which is what is probed here.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["apex_rms_norm", "apex_fused_adam", "notice"]


@functools.cache
def notice(what: str) -> None:
    """Print ``what`` once per process."""
    print(f"megatron-dual: {what}", file=sys.stderr)


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@functools.cache
def apex_rms_norm() -> Callable | None:
    """apex's fused RMSNorm ``f(x, weight, normalized_shape, eps)``, or None (with a notice) when apex is absent."""
    mod = _import("apex.normalization.fused_layer_norm")
    fn = getattr(mod, "fused_rms_norm_affine", None)
    if fn is None:
        notice(
            "model.fused_ops = apex but NVIDIA apex (with its CUDA extensions) is not installed: RMSNorm falls "
            "back to PyTorch, the other fused ops to Triton"
        )
    return fn


def apex_fused_adam(on_cuda: bool) -> type | None:
    """apex's FusedAdam class, or None (with a notice) when apex is absent or the parameters are not on CUDA."""
    cls = getattr(_import("apex.optimizers"), "FusedAdam", None)
    if cls is None:
        notice("optimizer.adamw_impl = apex but NVIDIA apex is not installed: using PyTorch's AdamW")
    elif not on_cuda:
        notice("optimizer.adamw_impl = apex needs CUDA parameters: using PyTorch's AdamW")
        cls = None
    return cls
