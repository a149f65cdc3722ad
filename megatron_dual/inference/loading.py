"""Load a trained model (and its tokenizer) from a checkpoint directory for inference.

``checkpoint`` may be a checkpoint directory (``.../step_00000100/`` holding ``meta.json`` and
``model.safetensors``), a directory holding ``step_*`` checkpoints (the latest complete one is used: complete means
``meta.json`` exists, since it is written last), or a run's output directory whose ``checkpoints/`` holds them. The
model is rebuilt from the config stored in ``meta.json``, so no config file is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_dual.config import Config, ConfigError, config_from_dict
from megatron_dual.engine.checkpoint import find_latest_checkpoint, load_model_weights, load_state_checked
from megatron_dual.model.transformer import DualTransformer

__all__ = ["find_checkpoint", "read_checkpoint_config", "check_device", "load_model"]


def find_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint directory that ``checkpoint`` names (see the module docstring); FileNotFoundError otherwise."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory (expected a checkpoint or run directory)")
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        latest = find_latest_checkpoint(root)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no checkpoint found at {path}: expected meta.json in it, or step_* checkpoint directories (with meta.json) "
        f"in it or in {path / 'checkpoints'}"
    )


def read_checkpoint_config(ckpt_dir: str | Path) -> Config:
    """The validated :class:`Config` stored in ``<ckpt_dir>/meta.json``; ValueError naming the file otherwise."""
    meta_path = Path(ckpt_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint metadata {meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint metadata {meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"checkpoint metadata {meta_path} has no 'config' mapping; cannot rebuild the model")
    try:
        return config_from_dict(meta["config"])
    except ConfigError as e:
        raise ValueError(f"checkpoint metadata {meta_path}: invalid config: {e}") from e


def _load_weights(ckpt_dir: Path, model: DualTransformer) -> None:
    from megatron_dual.parallel import resharding

    if resharding.checkpoint_tp(ckpt_dir) > 1:  # a tensor-parallel checkpoint: gather the shards into one model
        full, _, _ = resharding.read_checkpoint(ckpt_dir, with_optim=False)
        load_state_checked(model, full, ckpt_dir, strict=True)
        return
    weights = ckpt_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights {weights} do not exist")
    load_model_weights(ckpt_dir, model, strict=True)


def _load_tokenizer(spec: str, origin: str) -> Any:
    try:
        from megatron_dual.data.tokenizer import load_tokenizer
    except ImportError as e:
        raise ImportError(f"cannot load tokenizer {spec!r}: megatron_dual.data.tokenizer is unavailable ({e})") from e
    try:
        return load_tokenizer(spec)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"tokenizer {spec!r} ({origin}) not found: {e}") from e
    except (ValueError, OSError) as e:
        raise ValueError(f"tokenizer {spec!r} ({origin}) could not be loaded: {e}") from e


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device that this machine has; ValueError naming it otherwise (a misspelt name, or CUDA
    on a machine without it)."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as e:  # torch raises AssertionError for CUDA without a CUDA build
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {device!r} cannot be used here: {first}") from None
    return dev


def load_model(
    checkpoint: str, device: str = "cpu", tokenizer: str | None = None, dtype: torch.dtype | None = None
) -> tuple[DualTransformer, Config, Any]:
    """Rebuild the model from ``checkpoint``'s stored config, load its weights, put it in eval mode on ``device``.

    The tokenizer comes from ``tokenizer`` when given, else from the checkpoint's ``data.tokenizer``. ``dtype``
    casts the loaded model (default: keep the stored fp32 weights). Returns ``(model, config, tokenizer)``.
    Errors: FileNotFoundError naming the path for a missing checkpoint / weights / tokenizer file, ValueError naming
    ``meta.json`` for missing or invalid stored config.
    """
    torch_device = check_device(device)
    ckpt_dir = find_checkpoint(checkpoint)
    cfg = read_checkpoint_config(ckpt_dir)
    if tokenizer:
        spec, origin = tokenizer, "given"
    else:
        spec, origin = cfg.data.tokenizer, f"data.tokenizer in {ckpt_dir / 'meta.json'}"
    if not spec:
        raise ValueError(f"no tokenizer: {ckpt_dir / 'meta.json'} has an empty data.tokenizer and none was given")
    tok = _load_tokenizer(spec, origin)
    tok_vocab = getattr(tok, "vocab_size", None)
    if tok_vocab is not None and tok_vocab > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer {spec!r} has {tok_vocab} tokens but the model in {ckpt_dir} has model.vocab_size = "
            f"{cfg.model.vocab_size}"
        )
    with torch_device:
        model = DualTransformer(cfg.model)
    _load_weights(ckpt_dir, model)
    if dtype is not None:  # parameters only: the RoPE frequencies stay fp32
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.eval()
    return model, cfg, tok
