"""Zero padding of a weight to an aligned physical shape, invisible to checkpoints and optimizer state.

The SwiGLU MLP of ``dual-470m`` is 3554 wide: rows of 7108 (bf16) bytes are not 16-byte aligned, so cuBLAS refuses
its fast kernels and the SwiGLU kernel falls back to narrow loads. ``model.pad_intermediate_to = 64`` builds the MLP
3584 wide instead, with zero rows at the end of each half of the fused ``[up; gate]`` projection and zero columns at
the end of the down projection. The padded units compute ``0 * silu(0) = 0`` and receive exactly zero gradients
(their down columns are zero), so AdamW, weight decay and Muon (whose Newton-Schulz keeps zero rows zero) leave
them at zero and the model is the unpadded one up to the summation order of fp32 matmuls.

A padded parameter carries a :class:`Padding` (``param.padding``): along ``dim``, consecutive blocks of
(logical, physical) sizes, the logical rows first in each block. Everything outside the module sees the logical
layout: :func:`register_module_hooks` makes ``state_dict()`` return logical tensors and ``load_state_dict`` accept
them (padding on load), :func:`register_optimizer_hooks` does the same for optimizer state (AdamW moments, Muon
momentum), so checkpoints of padded and unpadded models are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Padding:
    dim: int
    blocks: tuple[tuple[int, int], ...]  # (logical, physical) size of each consecutive block along ``dim``

    @property
    def logical(self) -> int:
        return sum(n for n, _ in self.blocks)

    @property
    def physical(self) -> int:
        return sum(n for _, n in self.blocks)

    def logical_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        out[self.dim] = self.logical
        return tuple(out)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (``multiple`` <= 1: ``n`` itself)."""
    if multiple <= 1:
        return n
    return -(-n // multiple) * multiple


def unpad(t: torch.Tensor, spec: Padding) -> torch.Tensor:
    """The logical tensor of a physical one: the first ``logical`` entries of every block along ``spec.dim``."""
    pieces = t.split([p for _, p in spec.blocks], dim=spec.dim)
    return torch.cat([x.narrow(spec.dim, 0, n) for x, (n, _) in zip(pieces, spec.blocks, strict=True)], spec.dim)


def pad(t: torch.Tensor, spec: Padding) -> torch.Tensor:
    """The physical tensor of a logical one: every block zero-extended along ``spec.dim``."""
    out_shape = list(t.shape)
    out_shape[spec.dim] = spec.physical
    out = t.new_zeros(out_shape)
    dst = out.split([p for _, p in spec.blocks], dim=spec.dim)
    src = t.split([n for n, _ in spec.blocks], dim=spec.dim)
    for d, s, (n, _) in zip(dst, src, spec.blocks, strict=True):
        d.narrow(spec.dim, 0, n).copy_(s)
    return out


def padding_of(t: torch.Tensor) -> Padding | None:
    return getattr(t, "padding", None)


def padded_parameter(logical: torch.Tensor, spec: Padding) -> nn.Parameter:
    """A new parameter holding ``logical`` zero-padded to ``spec``, tagged with it."""
    param = nn.Parameter(pad(logical.detach(), spec), requires_grad=logical.requires_grad)
    param.padding = spec  # type: ignore[attr-defined]
    return param


def logical_numel(t: torch.Tensor) -> int:
    spec = padding_of(t)
    if spec is None:
        return t.numel()
    n = 1
    for s in spec.logical_shape(t.shape):
        n *= s
    return n


def register_module_hooks(module: nn.Module) -> None:
    """``module.state_dict()`` holds the logical tensors of its padded parameters; loading pads logical ones."""

    def save(mod: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
        for name, p in mod.named_parameters():
            spec = padding_of(p)
            if spec is not None and prefix + name in state:
                state[prefix + name] = unpad(state[prefix + name], spec)

    def load(mod: nn.Module, state: dict, prefix: str, *_: Any) -> None:
        for name, p in mod.named_parameters():
            spec, key = padding_of(p), prefix + name
            if spec is not None and key in state and tuple(state[key].shape) == spec.logical_shape(p.shape):
                state[key] = pad(state[key], spec)

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)


def _map_state(opt: torch.optim.Optimizer, state_dict: dict, to_logical: bool) -> dict:
    by_index: dict[int, torch.Tensor] = {}
    for saved, live in zip(state_dict["param_groups"], opt.param_groups, strict=False):  # torch reports mismatches
        by_index.update(zip(saved["params"], live["params"], strict=False))
    state = {}
    for idx, entry in state_dict["state"].items():
        p = by_index.get(idx)
        spec = padding_of(p) if p is not None else None
        if spec is not None:
            want = tuple(p.shape) if to_logical else spec.logical_shape(p.shape)
            fn = unpad if to_logical else pad
            entry = {
                k: fn(v, spec) if isinstance(v, torch.Tensor) and tuple(v.shape) == want else v
                for k, v in entry.items()
            }
        state[idx] = entry
    return {**state_dict, "state": state, "param_groups": _map_splits(opt, state_dict["param_groups"], to_logical)}


def _map_splits(opt: torch.optim.Optimizer, groups: list[dict], to_logical: bool) -> list[dict]:
    """Muon's ``splits`` (row blocks of a fused matrix) are saved logical; loading keeps the live (physical) ones."""
    out = []
    for saved, live in zip(groups, opt.param_groups, strict=False):
        saved = dict(saved)
        if saved.get("splits") and live.get("splits"):
            spec = padding_of(live["params"][0]) if live["params"] else None
            if not to_logical:
                saved["splits"] = list(live["splits"])
            elif spec is not None and spec.dim == 0 and len(spec.blocks) == len(saved["splits"]):
                saved["splits"] = [n for n, _ in spec.blocks]
        out.append(saved)
    return out + [dict(g) for g in groups[len(out) :]]


def register_optimizer_hooks(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Optimizer state of padded parameters saved at the logical shape and padded back on load (no-op when no
    parameter of ``opt`` is padded)."""
    if any(padding_of(p) is not None for g in opt.param_groups for p in g["params"]):
        opt.register_state_dict_post_hook(lambda o, sd: _map_state(o, sd, to_logical=True))
        opt.register_load_state_dict_pre_hook(lambda o, sd: _map_state(o, sd, to_logical=False))
    return opt
