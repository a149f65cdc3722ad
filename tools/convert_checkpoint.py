#!/usr/bin/env python
"""Reshard a megatron-dual checkpoint between tensor-parallel sizes, or convert it to/from transformers (lossless).

    python tools/convert_checkpoint.py runs/x/checkpoints/step_00001000 runs/x_tp4/checkpoints/step_00001000 --tp 4
    python tools/convert_checkpoint.py runs/x_tp4/checkpoints runs/single/step_00001000 --tp 1   # latest -> one file
    python tools/convert_checkpoint.py runs/x hf/x --to hf            # a directory transformers loads (remote code)
    python tools/convert_checkpoint.py hf/x runs/x_back --from hf     # transformers directory -> checkpoint root
    python tools/convert_checkpoint.py ckpt/state_dict.bin runs/ltg --from ltg --ltg-config configs/large.json

``--to hf`` / ``--from hf`` / ``--from ltg`` are described in :mod:`megatron_dual.hf` (weight names in
``megatron_dual/hf/names.py``); ``--from`` writes a checkpoint root holding ``step_00000000`` (weights and config,
no optimizer state). ``--from ltg`` reads the paper's training code's ``state_dict.bin`` (or its folder); its
config json defaults to the paper's ``configs/large.json`` (the ``dual-470m`` shape).

The source is a checkpoint directory in either form (or a checkpoint root: its latest complete checkpoint); the
destination is created (``--force`` replaces it). ``--tp 1`` writes the single-file form of
``megatron_dual/engine/checkpoint.py`` (``model.safetensors``, ``optim.pt``, ``rng.pt``, ``meta.json``); ``--tp n``
writes ``model_tp{r}of{n}.safetensors`` + ``optim_tp{r}of{n}.pt`` per TP rank and a ``layout.json`` manifest. The
format is documented in :mod:`megatron_dual.parallel.resharding`. Model weights and optimizer state (AdamW and Muon)
are resharded; ``--model-only`` drops the optimizer state. Only ``rng.pt`` is carried over.

A checkpoint of the DeepSpeed engine (``engine.name: deepspeed``, any ZeRO stage, any DP size, any TP size) is
converted by ``--tp n`` to the single-file or TP form with its weights in fp32 (the ZeRO partitions of the optimizer
state are not carried: the result has no ``optim.pt``). Back: a run with ``engine.name: deepspeed`` resumes from
either plain form (weights; the optimizers start afresh, with a notice).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dual.config import ConfigError  # noqa: E402
from megatron_dual.engine.checkpoint import CheckpointError  # noqa: E402
from megatron_dual.parallel.resharding import ReshardError, checkpoint_tp, convert_checkpoint  # noqa: E402


class ToolError(SystemExit):
    """Exit status 2 with a one-line ``error: ...`` message (printed by ``__main__``)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _resolve_source(path: Path) -> Path:
    if (path / "meta.json").is_file():
        return path
    from megatron_dual.engine.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ReshardError(f"{path} is neither a complete checkpoint (no meta.json) nor a directory holding one")
    return latest


# The paper's configs/large.json (ltgoslo/dual-language-models): the dual-470m shape.
LTG_LARGE = {
    "attention_pre_norm_affine": True,
    "classifier_pre_norm_affine": True,
    "d_h": 64,
    "feed_forward_pre_norm_affine": True,
    "hidden_size": 1024,
    "intermediate_size": 3554,
    "max_sequence_length": 2048,
    "norm_eps": 1e-07,
    "num_attention_heads": 16,
    "num_layers": 24,
    "rope_theta": 160000,
    "vocab_size": 51200,
    "tie_weights": False,
}


def _convert_hf(args: argparse.Namespace) -> str:
    from megatron_dual import hf

    if args.to == "hf":
        out = hf.export_checkpoint(args.src, args.dst, force=args.force)
        return f"{args.src} -> {out} (transformers, trust_remote_code=True)"
    if args.source == "hf":
        out = hf.import_hf(args.src, args.dst, force=args.force)
    else:
        config = args.ltg_config or LTG_LARGE
        out = hf.import_ltg(args.src, config, args.dst, force=args.force, tokenizer=args.tokenizer)
    return f"{args.src} ({args.source}) -> {out}"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="checkpoint directory (step_*) or a checkpoint root (latest is used)")
    ap.add_argument("dst", type=Path, help="the checkpoint directory to write")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tp", type=int, help="tensor-parallel size of the result (1: single file)")
    mode.add_argument("--to", choices=["hf"], help="export to a transformers directory")
    mode.add_argument(
        "--from",
        dest="source",
        choices=["hf", "ltg"],
        help="import a transformers directory (hf) or a reference-code state dict (ltg)",
    )
    ap.add_argument("--ltg-config", type=Path, help="--from ltg: the reference config json (default: large.json)")
    ap.add_argument("--tokenizer", default="ltg", help="--from ltg: tokenizer ('ltg' or a tokenizer.json)")
    ap.add_argument("--model-only", action="store_true", help="drop the optimizer state")
    ap.add_argument("--force", action="store_true", help="replace dst if it exists")
    return ap


def _convert_zero(src: Path, dst: Path, tp: int, force: bool) -> Path:
    from megatron_dual.engine.deepspeed import read_zero_checkpoint
    from megatron_dual.parallel.resharding import check_destination, write_checkpoint

    check_destination(src, dst, force)  # a run converted into itself would lose its ZeRO state
    full, meta = read_zero_checkpoint(src)  # a bad source leaves dst as it was
    meta = {k: v for k, v in meta.items() if k != "engine"}
    return write_checkpoint(dst, full, None, meta, tp, rng_from=src, replace=force)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.tp is None:
            print(_convert_hf(args))
            return 0
        src = _resolve_source(args.src)
        if (src / "deepspeed").is_dir():
            out = _convert_zero(src, args.dst, args.tp, args.force)
            print(f"{src} (DeepSpeed) -> {out} (tp {args.tp}, weights only)")
            return 0
        out = convert_checkpoint(src, args.dst, args.tp, model_only=args.model_only, force=args.force)
    except (ReshardError, ConfigError, CheckpointError, OSError, ValueError) as e:
        raise ToolError(f"error: {e}") from None
    print(f"{src} (tp {checkpoint_tp(src)}) -> {out} (tp {args.tp})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ToolError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
