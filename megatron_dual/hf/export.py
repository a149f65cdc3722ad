"""Export a megatron-dual model to a directory that transformers loads with ``trust_remote_code=True``.

The directory holds ``model.safetensors`` (transformers' Llama names for the trunk, see :mod:`.names`),
``config.json`` (:mod:`.hf_config`), ``generation_config.json``, ``modeling_dlm_llama.py`` (the two model classes),
the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) and
``megatron_dual_config.json`` (the full training config, so an import restores it). It is written into a temporary
sibling directory and renamed into place, so a killed export leaves no half directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from megatron_dual.config import Config
from megatron_dual.engine.checkpoint import check_not_source, staged_dir
from megatron_dual.hf.hf_config import MODELING_FILE, to_hf_config
from megatron_dual.hf.names import ConversionError, to_hf_state
from megatron_dual.model.transformer import DualTransformer

__all__ = ["export_model", "export_checkpoint", "tokenizer_files"]

MEGATRON_CONFIG = "megatron_dual_config.json"
_SPECIALS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def tokenizer_files(tokenizer_json: str | os.PathLike, out: Path, max_len: int) -> None:
    """Copy ``tokenizer.json`` into ``out`` with the transformers side files (a ``PreTrainedTokenizerFast``)."""
    src = Path(tokenizer_json)
    shutil.copyfile(src, out / "tokenizer.json")
    licence = src.parent / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, out / "tokenizer_LICENSE")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        **_SPECIALS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(_SPECIALS, indent=2) + "\n")


def export_model(
    model: DualTransformer,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    config: Config | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` (and ``tokenizer``: a project Tokenizer, or a path to its ``tokenizer.json``) to ``out_dir``.

    ``config``: the full training config, recorded in ``megatron_dual_config.json`` (optional).
    """
    out = Path(out_dir)
    cfg = model.cfg
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if tok_vocab is not None and tok_vocab > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {tok_vocab} tokens but the model only {cfg.vocab_size}")
    state = to_hf_state({k: v.float().cpu() for k, v in model.state_dict().items()}, cfg)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (pass --force to replace it)")
    with staged_dir(out, ConversionError) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = to_hf_config(cfg)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        shutil.copyfile(Path(__file__).with_name(MODELING_FILE), tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer_files(getattr(tokenizer, "path", tokenizer), tmp, cfg.max_seq_len)
        if config is not None:
            (tmp / MEGATRON_CONFIG).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Export a megatron-dual checkpoint (or run / checkpoint root: its latest) with its tokenizer and config."""
    from megatron_dual.inference.loading import find_checkpoint, load_model

    check_not_source(find_checkpoint(checkpoint), out_dir, ConversionError)
    model, cfg, tok = load_model(str(checkpoint), device="cpu")
    return export_model(model, out_dir, tokenizer=tok, config=cfg, force=force)
