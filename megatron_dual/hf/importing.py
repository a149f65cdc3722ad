"""Import a transformers directory (our export, or a hub layout with transformers' Llama names) or a checkpoint of
the reference training code into a megatron-dual checkpoint that ``generate``, ``fill-mask`` and evaluation load.

The result is a checkpoint root ``DST`` holding ``DST/step_00000000/`` in the single-file form of
:mod:`megatron_dual.engine.checkpoint` (weights, ``meta.json`` with the config) and ``DST/tokenizer.json``; its
``optim.pt`` holds no optimizer state (the source has none).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from megatron_dual.config import Config, ConfigError, ModelConfig, config_from_dict
from megatron_dual.engine.checkpoint import check_not_source, load_state_checked, staged_dir
from megatron_dual.hf.export import MEGATRON_CONFIG
from megatron_dual.hf.hf_config import from_hf_config, from_ltg_config, ltg_flags
from megatron_dual.hf.names import ConversionError, from_hf_state, from_ltg_state
from megatron_dual.model.transformer import DualTransformer

__all__ = ["read_hf_dir", "read_ltg_checkpoint", "import_hf", "import_ltg", "build_model", "write_checkpoint"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch pickle of a state dict (``weights_only``; a ``{"model": ...}`` wrapper is
    unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ConversionError(f"{path} is not a readable state dict: {e}") from None
    if isinstance(blob, Mapping) and "model" in blob and isinstance(blob["model"], Mapping):
        blob = blob["model"]
    if not isinstance(blob, Mapping) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return dict(blob)


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_load_tensors(path / name))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _load_tensors(path / name)
    raise ConversionError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_hf_dir(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and our state dict of a transformers directory; ConversionError for another architecture or
    missing / extra tensors."""
    src = Path(path)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory (expected an exported transformers directory)")
    cfg = from_hf_config(_read_json(src / "config.json"), str(src / "config.json"))
    return cfg, from_hf_state(_hf_weights(src), cfg, str(src))


def read_ltg_checkpoint(
    path: str | os.PathLike, ltg_config: str | os.PathLike | Mapping[str, Any]
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model config and our state dict of a reference-code checkpoint (``state_dict.bin`` or its folder) given its
    config json (e.g. ``configs/large.json``)."""
    src = Path(path)
    if src.is_dir():
        src = src / "state_dict.bin"
    ltg = ltg_config if isinstance(ltg_config, Mapping) else _read_json(Path(ltg_config))
    cfg = from_ltg_config(ltg, str(ltg_config) if not isinstance(ltg_config, Mapping) else "reference config")
    state = from_ltg_state(
        _load_tensors(src), cfg, affine=ltg_flags(ltg), tied=bool(ltg.get("tie_weights")), source=str(src)
    )
    return cfg, state


def build_model(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> DualTransformer:
    """A DualTransformer on CPU holding ``state`` exactly (strict)."""
    model = DualTransformer(cfg)
    load_state_checked(model, {k: v.float() for k, v in state.items()}, "imported state", strict=True)
    return model.eval()


_ARCH_FIELDS = (
    "n_layers",
    "hidden_size",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
)  # the rest (backend, fused ops, padding) is a run choice


def _full_config(model_cfg: ModelConfig, tokenizer: str, base: Mapping[str, Any] | None) -> Config:
    tree = dict(base) if base else Config().to_dict()
    arch = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k in _ARCH_FIELDS}
    tree["model"] = {**dict(tree.get("model") or {}), **arch}
    data = dict(tree.get("data") or {})
    data["tokenizer"] = tokenizer
    data["seq_len"] = min(int(data.get("seq_len", model_cfg.max_seq_len)), model_cfg.max_seq_len)
    tree["data"] = data
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise ConversionError(f"the imported model's config is invalid: {e}") from None


def write_checkpoint(
    model: DualTransformer,
    config: Config,
    dst: str | os.PathLike,
    source: str,
    tokenizer_json: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as checkpoint root ``dst`` (``dst/step_00000000``); returns the step directory. It is
    written into a temporary sibling and renamed into place, so a failed import leaves an existing ``dst`` (with
    ``force``) as it was."""
    from megatron_dual.engine.checkpoint import save_checkpoint  # looked up at call time (tests patch it)

    root = Path(dst)
    if root.exists() and not force:
        raise ConversionError(f"{root} exists (pass --force to replace it)")
    with staged_dir(root, ConversionError) as tmp:
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            config.data.tokenizer = str((root / "tokenizer.json").resolve())
        empty = {"optimizers": {}, "schedulers": {}}
        step = save_checkpoint(tmp, 0, model, empty, {}, config.to_dict(), extra={"imported_from": source})
    return root / step.name


def import_hf(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False) -> Path:
    """transformers directory -> megatron-dual checkpoint root ``dst``. The source's ``tokenizer.json`` is copied
    beside the checkpoint; without one the config names the vendored ``ltg`` tokenizer when the vocabulary has its
    51,200 ids, else none (pass ``--tokenizer`` when loading)."""
    src_dir = Path(src)
    check_not_source(src_dir, dst, ConversionError)
    cfg, state = read_hf_dir(src_dir)
    base = _read_json(src_dir / MEGATRON_CONFIG) if (src_dir / MEGATRON_CONFIG).is_file() else None
    tok = src_dir / "tokenizer.json"
    config = _full_config(cfg, "ltg" if cfg.vocab_size == 51200 else "", base)
    return write_checkpoint(
        build_model(cfg, state), config, dst, str(src_dir), tokenizer_json=tok if tok.is_file() else None, force=force
    )


def import_ltg(
    src: str | os.PathLike,
    ltg_config: str | os.PathLike,
    dst: str | os.PathLike,
    force: bool = False,
    tokenizer: str = "ltg",
) -> Path:
    """Reference-code checkpoint -> megatron-dual checkpoint root ``dst`` (tokenizer: ``ltg`` or a path)."""
    check_not_source(src, dst, ConversionError)
    cfg, state = read_ltg_checkpoint(src, ltg_config)
    config = _full_config(cfg, tokenizer, None)
    tok = None if tokenizer == "ltg" else tokenizer
    return write_checkpoint(build_model(cfg, state), config, dst, str(src), tokenizer_json=tok, force=force)
