#!/usr/bin/env python
"""Inspect a Megatron .bin/.idx dataset: header, counts, length statistics, token histogram, decoded documents.

    python tools/inspect_dataset.py data/corpus_text_document --tokenizer ltg --doc 0 --doc 17

Corrupt or truncated files are reported with the file and the field at fault.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.data.encoders import load_encoder  # noqa: E402
from megatron_dual.data.indexed import IndexedDataset  # noqa: E402
from megatron_dual.data.inspect import describe, format_description  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--tokenizer", default=None, help="'ltg', a tokenizer.json or a .model: names ids and decodes")
    p.add_argument("--doc", type=int, action="append", default=[], help="print document K (repeatable; -1 = last)")
    p.add_argument("--top", type=int, default=20, help="most frequent token ids to list (default: 20)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=100_000_000,
        help="histogram over at most this many tokens, in evenly spaced chunks (default: 1e8)",
    )
    p.add_argument("--ids", action="store_true", help="print the token ids of --doc documents, not only the text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        enc = load_encoder(args.tokenizer, fast=False) if args.tokenizer else None
        info = describe(args.prefix, top=args.top, max_tokens=args.max_tokens)
        id_to_token = None
        if enc is not None and hasattr(enc, "tok"):
            id_to_token = enc.tok.id_to_token
        elif enc is not None and hasattr(enc, "sp"):
            id_to_token = enc.sp.id_to_piece
        print(format_description(info, id_to_token))
        ds = IndexedDataset(args.prefix)
        for k in args.doc:
            ids = ds[k]
            print(f"--- document {k} ({ids.size:,} tokens)")
            if args.ids or enc is None:
                print(" ".join(str(int(i)) for i in ids))
            if enc is not None:
                print(enc.decode(ids, skip_special=False))
    except (FileNotFoundError, ValueError, IndexError) as e:
        print(f"inspect_dataset: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
