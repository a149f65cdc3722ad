#!/usr/bin/env python
"""Train a byte-level BPE tokenizer with the ltg pipeline and this project's 16 special tokens.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 32000 --output tok/

writes tok/tokenizer.json, usable as --tokenizer tok/ or data.tokenizer=tok/.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.data.tokenizer import iter_training_texts, save_tokenizer, train_bpe_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json lines (see --json-key) or .txt files")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, specials included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument("--output", required=True, help="output directory (writes <DIR>/tokenizer.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        texts = iter_training_texts(args.input, json_key=args.json_key)
        missing = [p for p in args.input if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"input file not found: {missing[0]}")
        tok = train_bpe_tokenizer(texts, args.vocab_size, min_frequency=args.min_frequency)
        path = save_tokenizer(tok, os.path.join(args.output, "tokenizer.json"))
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {tok.vocab_size:,} tokens ({tok.n_special} special at ids 0..{tok.n_special - 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
