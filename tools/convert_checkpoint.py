#!/usr/bin/env python
"""Reshard a megatron-dual checkpoint between tensor-parallel sizes, or to/from the single-file form (lossless).

    python tools/convert_checkpoint.py runs/x/checkpoints/step_00001000 runs/x_tp4/checkpoints/step_00001000 --tp 4
    python tools/convert_checkpoint.py runs/x_tp4/checkpoints runs/single/step_00001000 --tp 1   # latest -> one file

The source is a checkpoint directory in either form (or a checkpoint root: its latest complete checkpoint); the
destination is created (``--force`` replaces it). ``--tp 1`` writes the single-file form of
``megatron_dual/engine/checkpoint.py`` (``model.safetensors``, ``optim.pt``, ``rng.pt``, ``meta.json``); ``--tp n``
writes ``model_tp{r}of{n}.safetensors`` + ``optim_tp{r}of{n}.pt`` per TP rank and a ``layout.json`` manifest. The
format is documented in :mod:`megatron_dual.parallel.resharding`. Model weights and optimizer state (AdamW and Muon)
are resharded; ``--model-only`` drops the optimizer state. Only ``rng.pt`` is carried over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_dual.config import ConfigError  # noqa: E402
from megatron_dual.parallel.resharding import ReshardError, checkpoint_tp, convert_checkpoint  # noqa: E402


def _resolve_source(path: Path) -> Path:
    if (path / "meta.json").is_file():
        return path
    from megatron_dual.engine.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise ReshardError(f"{path} is neither a complete checkpoint (no meta.json) nor a directory holding one")
    return latest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="checkpoint directory (step_*) or a checkpoint root (latest is used)")
    ap.add_argument("dst", type=Path, help="the checkpoint directory to write")
    ap.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the result (1: single file)")
    ap.add_argument("--model-only", action="store_true", help="drop the optimizer state")
    ap.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = ap.parse_args(argv)
    try:
        src = _resolve_source(args.src)
        out = convert_checkpoint(src, args.dst, args.tp, model_only=args.model_only, force=args.force)
    except (ReshardError, ConfigError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{src} (tp {checkpoint_tp(src)}) -> {out} (tp {args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
