"""Checkpoints across tensor-parallel layouts: the sharded format and lossless resharding between TP sizes.

Single-file form (TP 1): the layout of :mod:`megatron_dual.engine.checkpoint`, ``step_XXXXXXXX/{model.safetensors,
optim.pt, rng.pt, meta.json}``. TP form (TP n > 1), written by DP rank 0's TP group (TP rank r writes its files)::

    step_XXXXXXXX/
        model_tp{r}of{n}.safetensors   TP rank r's model state dict: the single-process tensor names, local shapes
                                       (exactly ``shard_state_dict(full, r, n, cfg)``; replicated tensors in every
                                       file)
        optim_tp{r}of{n}.pt            TP rank r's ``{"optimizers": {name: state_dict}, "schedulers": {...}}`` (the
                                       structure of optim.pt; per-parameter state tensors have the local shapes,
                                       Muon groups' ``splits`` are the local row blocks); optional
        rng.pt                         the replicated RNG streams (as in the single-file form)
        layout.json                    the manifest, see below
        meta.json                      as in the single-file form (``tensors``: the FULL shapes), plus
                                       ``"tensor_parallel": {"tp": n}``; written last, so its presence marks a
                                       complete checkpoint

``layout.json``::

    {"format": "megatron-dual-tp/1", "tp": n,
     "files": {"model": ["model_tp0ofn.safetensors", ...], "optim": ["optim_tp0ofn.pt", ...] or []},
     "tensors": {name: {"shape": [full shape], "dim": split dim or null (replicated), "splits": [row blocks] or
                 null}}}

How a tensor is split is :func:`megatron_dual.parallel.layers.sharding_of` (``dim`` 0 for the embedding, the output
layer and its bias, qkv (per q/k/v block) and up (per up/gate block); ``dim`` 1 for attn.out and mlp.down).

Optimizer state: the parameter behind each index of an optimizer's state dict is found by building the optimizers
of the checkpoint's config over a model on the ``meta`` device (the same code path the trainer uses, so the same
order); state tensors shaped like their parameter are resharded like it, everything else (steps, scheduler state)
is replicated. Per-TP-rank RNG files (anything but ``rng.pt``) are not carried across a TP change: streams that
differ by TP rank are re-seeded by the trainer. All conversions are pure slicing and concatenation: bit-exact.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megatron_dual.config import ModelConfig, config_from_dict
from megatron_dual.engine.checkpoint import check_not_source, staged_dir
from megatron_dual.parallel.layers import (
    check_tp_divisibility,
    shard_state_dict,
    shard_tensor,
    sharding_of,
    unshard_tensor,
)
from megatron_dual.parallel.layers import gather_state_dict as _gather_model

__all__ = [
    "TP_FORMAT",
    "LAYOUT",
    "model_file",
    "optim_file",
    "checkpoint_tp",
    "read_checkpoint",
    "write_checkpoint",
    "layout_manifest",
    "load_model_shard",
    "convert_checkpoint",
    "check_destination",
    "optimizer_param_names",
    "shard_optimizer_state",
    "gather_optimizer_state",
]

TP_FORMAT = "megatron-dual-tp/1"
CKPT_FORMAT = "megatron-dual-checkpoint/1"  # engine/checkpoint.py's FORMAT
LAYOUT = "layout.json"
META = "meta.json"
RNG = "rng.pt"


def model_file(tp_rank: int, tp_size: int) -> str:
    return "model.safetensors" if tp_size == 1 else f"model_tp{tp_rank}of{tp_size}.safetensors"


def optim_file(tp_rank: int, tp_size: int) -> str:
    return "optim.pt" if tp_size == 1 else f"optim_tp{tp_rank}of{tp_size}.pt"


class ReshardError(RuntimeError):
    """A checkpoint cannot be read or converted; the message names the file."""


def checkpoint_tp(path: str | Path) -> int:
    """The TP size a checkpoint directory was written with (1 for the single-file form)."""
    layout = Path(path) / LAYOUT
    if not layout.is_file():
        return 1
    data = json.loads(layout.read_text())
    if data.get("format") != TP_FORMAT:
        raise ReshardError(f"{layout}: unknown format {data.get('format')!r} (expected {TP_FORMAT!r})")
    return int(data["tp"])


# ------------------------------------------------------------------------------------------------ optimizer state
def optimizer_param_names(config: Mapping[str, Any]) -> dict[str, list[list[str]]]:
    """``{optimizer name: [[parameter name per index of group g] for g]}`` for the checkpoint config ``config``."""
    from megatron_dual.model.transformer import DualTransformer
    from megatron_dual.optim.muon import build_optimizers

    cfg = config_from_dict(copy.deepcopy(dict(config)))
    with torch.device("meta"):
        model = DualTransformer(cfg.model)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizers = build_optimizers(model, cfg.optimizer)
    return {k: [[names[id(p)] for p in g["params"]] for g in o.param_groups] for k, o in optimizers.items()}


def _index_names(sd: Mapping[str, Any], group_names: list[list[str]], opt: str) -> dict[int, str]:
    groups = sd["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g) for g in group_names]:
        raise ReshardError(
            f"optimizer {opt!r}: saved param groups of sizes {[len(g['params']) for g in groups]} do "
            f"not match the config's {[len(g) for g in group_names]}"
        )
    return {i: n for g, names in zip(groups, group_names, strict=True) for i, n in zip(g["params"], names, strict=True)}


def _rescale_splits(sd: dict[str, Any], num: int, den: int) -> None:
    for g in sd["param_groups"]:
        if isinstance(g.get("splits"), list | tuple):
            g["splits"] = [int(s) * num // den for s in g["splits"]]


def shard_optimizer_state(
    full: Mapping[str, Any],
    names: Mapping[str, list[list[str]]],
    full_shapes: Mapping[str, tuple[int, ...]],
    tp_rank: int,
    tp_size: int,
    cfg: ModelConfig,
) -> dict[str, Any]:
    """TP rank ``tp_rank``'s optim blob (``{"optimizers", "schedulers"}``) from the single-process one."""
    out = copy.deepcopy({k: v for k, v in full.items() if k != "optimizers"})
    out["optimizers"] = {}
    for opt, sd in full["optimizers"].items():
        index = _index_names(sd, names[opt], opt)
        new = {"param_groups": copy.deepcopy(sd["param_groups"]), "state": {}}
        _rescale_splits(new, 1, tp_size)
        for i, st in sd["state"].items():
            name = index[int(i)]
            spec = sharding_of(name, cfg)
            new["state"][i] = {
                k: (
                    shard_tensor(v, spec[0], spec[1], tp_rank, tp_size)
                    if spec is not None and isinstance(v, torch.Tensor) and tuple(v.shape) == full_shapes[name]
                    else copy.deepcopy(v)
                )
                for k, v in st.items()
            }
        out["optimizers"][opt] = new
    return out


def gather_optimizer_state(
    shards: list[Mapping[str, Any]],
    names: Mapping[str, list[list[str]]],
    full_shapes: Mapping[str, tuple[int, ...]],
    cfg: ModelConfig,
) -> dict[str, Any]:
    """The single-process optim blob from the TP ranks' ones (replicated entries from rank 0)."""
    tp = len(shards)
    out = copy.deepcopy({k: v for k, v in shards[0].items() if k != "optimizers"})
    out["optimizers"] = {}
    for opt, sd in shards[0]["optimizers"].items():
        index = _index_names(sd, names[opt], opt)
        new = {"param_groups": copy.deepcopy(sd["param_groups"]), "state": {}}
        _rescale_splits(new, tp, 1)
        for i, st in sd["state"].items():
            name = index[int(i)]
            spec = sharding_of(name, cfg)
            entry = {}
            for k, v in st.items():
                local_shape = None
                if spec is not None and isinstance(v, torch.Tensor):
                    shape = list(full_shapes[name])
                    shape[spec[0]] //= tp
                    local_shape = tuple(shape)
                if local_shape is not None and tuple(v.shape) == local_shape and tp > 1:
                    entry[k] = unshard_tensor([s["optimizers"][opt]["state"][i][k] for s in shards], spec[0], spec[1])
                else:
                    entry[k] = copy.deepcopy(v)
            new["state"][i] = entry
        out["optimizers"][opt] = new
    return out


# ------------------------------------------------------------------------------------------------ read / write
def layout_manifest(
    full_shapes: Mapping[str, tuple[int, ...] | list[int]], cfg: ModelConfig, tp: int, with_optim: bool = True
) -> dict[str, Any]:
    """The ``layout.json`` content of a TP-``tp`` checkpoint of a model with these full tensor shapes (for a trainer
    writing its own TP checkpoints: each TP rank saves ``model_file(tp_rank, tp)``, one rank this manifest)."""
    tensors = {}
    for k, shape in full_shapes.items():
        dim, splits = sharding_of(k, cfg) or (None, None)
        tensors[k] = {"shape": list(shape), "dim": dim, "splits": splits}
    return {
        "format": TP_FORMAT,
        "tp": tp,
        "files": {
            "model": [model_file(r, tp) for r in range(tp)],
            "optim": [optim_file(r, tp) for r in range(tp)] if with_optim else [],
        },
        "tensors": tensors,
    }


def load_model_shard(path: str | Path, tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s model state dict for a run with TP size ``tp_size`` from a checkpoint of any TP size
    (its own file when the sizes agree, else resharded on the fly)."""
    path = Path(path)
    if checkpoint_tp(path) == tp_size:
        return _load_weights(path / model_file(tp_rank, tp_size))
    full, _, meta = read_checkpoint(path, with_optim=False)
    cfg = config_from_dict(copy.deepcopy(meta["config"]))
    return shard_state_dict(full, tp_rank, tp_size, cfg.model)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ReshardError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise ReshardError(f"{path} is corrupt or truncated: {e}") from e


def read_checkpoint(
    path: str | Path, with_optim: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """``(full model state dict, full optim blob or None, meta)`` of a checkpoint in either form."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise ReshardError(f"{path} is not a complete checkpoint: {META} is missing")
    meta = json.loads(meta_path.read_text())
    tp = checkpoint_tp(path)
    cfg = config_from_dict(copy.deepcopy(meta["config"])) if meta.get("config") else None
    if cfg is None:
        raise ReshardError(f"{meta_path} holds no config: the model shape needed to reshard is unknown")
    model_shards = [_load_weights(path / model_file(r, tp)) for r in range(tp)]
    full = _gather_model(model_shards, cfg.model) if tp > 1 else model_shards[0]
    optim = None
    optim_paths = [path / optim_file(r, tp) for r in range(tp)]
    if with_optim and all(p.is_file() for p in optim_paths):
        blobs = [torch.load(p, map_location="cpu", weights_only=True) for p in optim_paths]
        if tp == 1:
            optim = blobs[0]
        else:
            shapes = {k: tuple(v.shape) for k, v in full.items()}
            optim = gather_optimizer_state(blobs, optimizer_param_names(meta["config"]), shapes, cfg.model)
    return full, optim, meta


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    path: str | Path,
    full: Mapping[str, torch.Tensor],
    optim: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    tp: int,
    rng_from: str | Path | None = None,
    replace: bool = False,
) -> Path:
    """Write a checkpoint directory in TP form ``tp`` (single-file form for 1) atomically: into a temporary
    sibling, ``meta.json`` last, then renamed to ``path``, which must not exist unless ``replace`` (an existing
    ``path`` is removed only once the new checkpoint is complete)."""
    path = Path(path)
    cfg = config_from_dict(copy.deepcopy(dict(meta["config"])))
    check_tp_divisibility(cfg.model, tp)
    if path.exists() and not replace:
        raise ReshardError(f"{path} exists")
    with staged_dir(path, ReshardError) as tmp:
        step = str(meta.get("step", ""))
        names = optimizer_param_names(meta["config"]) if optim is not None and tp > 1 else None
        shapes = {k: tuple(v.shape) for k, v in full.items()}
        for r in range(tp):
            sd = shard_state_dict(full, r, tp, cfg.model)
            sd = {k: v.contiguous() for k, v in sd.items()}
            save_file(
                sd, str(tmp / model_file(r, tp)), metadata={"format": CKPT_FORMAT, "step": step, "tp": f"{r}/{tp}"}
            )
            if optim is not None:
                blob = shard_optimizer_state(optim, names, shapes, r, tp, cfg.model) if tp > 1 else optim
                torch.save(blob, tmp / optim_file(r, tp))
        if rng_from is not None and (Path(rng_from) / RNG).is_file():
            shutil.copy2(Path(rng_from) / RNG, tmp / RNG)
        new_meta = dict(meta)
        new_meta["tensors"] = {k: list(v) for k, v in shapes.items()}
        if tp > 1:
            _write_json(tmp / LAYOUT, layout_manifest(shapes, cfg.model, tp, optim is not None))
            new_meta["tensor_parallel"] = {"tp": tp}
        else:
            new_meta.pop("tensor_parallel", None)
        new_meta["converted"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_json(tmp / META, new_meta)
    return path


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """ReshardError where writing ``dst`` would replace the source (``dst`` is it or a folder holding it, even with
    ``force``) or an existing ``dst`` without ``force``."""
    check_not_source(src, dst, ReshardError)
    if dst.exists() and not force:
        raise ReshardError(f"{dst} exists; pass --force to overwrite it")


def convert_checkpoint(
    src: str | Path, dst: str | Path, tp: int, model_only: bool = False, force: bool = False
) -> Path:
    """Reshard checkpoint directory ``src`` (either form) into ``dst`` with TP size ``tp`` (1: single-file form)."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, force)
    full, optim, meta = read_checkpoint(src, with_optim=not model_only)  # a bad source leaves dst as it was
    return write_checkpoint(dst, full, optim, meta, tp, rng_from=src, replace=force)
