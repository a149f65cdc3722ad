#!/usr/bin/env python
"""Train a byte-level BPE tokenizer with the ltg pipeline and this project's 16 special tokens (ids 0..15).

    python tools/train_tokenizer.py --input corpus/ --vocab-size 32000 --output tok/

writes tok/tokenizer.json, usable as --tokenizer tok/ or data.tokenizer=tok/. Inputs are read exactly like
preprocess_data.py reads them (files, directories, globs; .jsonl/.txt/.parquet, optionally .gz/.zst), streaming: memory
grows with the number of distinct words, not with the corpus; --max-documents / --max-bytes stop early.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from megatron_dual.data.preprocess import TXT_MODES, expand_inputs, iter_documents  # noqa: E402
from megatron_dual.data.tokenizer import save_tokenizer, train_bpe_tokenizer  # noqa: E402


def count(text: str) -> int:
    """A whole number >= 0 (0: no limit); a negative one would stop after the first text."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give a count >= 0 (0: no limit)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json lines (see --json-key) or .txt files")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, specials included")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (default: 2)")
    p.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="blank-line",
        help=".txt inputs: one text per blank-line block (default) or per file",
    )
    p.add_argument("--max-documents", type=count, default=0, help="stop after this many texts (0: all)")
    p.add_argument("--max-bytes", type=count, default=0, help="stop after this many characters of text (0: all)")
    p.add_argument("--output", required=True, help="output directory (writes <DIR>/tokenizer.json)")
    return p


def _no_texts(json_key: str, files: list[str], skipped: Counter[str]) -> str:
    why = ", ".join(f"{reason}: {n:,}" for reason, n in skipped.most_common()) or "the input is empty"
    return f"no texts to train on in {len(files)} input file(s) (--json-key {json_key}; {why}); nothing written"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skipped: Counter[str] = Counter()
    seen = {"documents": 0, "chars": 0}

    def texts() -> Iterator[str]:
        for text in iter_documents(files, json_key=args.json_key, txt_mode=args.txt_mode, skipped=skipped):
            yield text
            seen["documents"] += 1
            seen["chars"] += len(text)
            if (args.max_documents and seen["documents"] >= args.max_documents) or (
                args.max_bytes and seen["chars"] >= args.max_bytes
            ):
                return

    try:
        files = expand_inputs(args.input)
        tok = train_bpe_tokenizer(texts(), args.vocab_size, min_frequency=args.min_frequency)
        if not seen["documents"]:  # an empty corpus or a misspelt --json-key: keep any tokenizer already there
            raise ValueError(_no_texts(args.json_key, files, skipped))
        path = save_tokenizer(tok, os.path.join(args.output, "tokenizer.json"))
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(
        f"trained on {seen['documents']:,} texts ({seen['chars']:,} characters); skipped "
        f"{sum(skipped.values()):,}" + (f" ({dict(skipped)})" if skipped else "")
    )
    print(f"wrote {path}: {tok.vocab_size:,} tokens ({tok.n_special} special at ids 0..{tok.n_special - 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
