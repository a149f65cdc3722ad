#!/usr/bin/env python
"""Merge several Megatron .bin/.idx datasets into one (e.g. the shards of preprocess_data.py --partitions).

    python tools/merge_datasets.py --input data/web_text_document_000 data/web_text_document_001 \
        --output-prefix data/web_text_document

--input takes prefixes or glob patterns of .idx files; the merged dataset keeps every sequence and document in
input order. Streaming: memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.data.indexed import merge_datasets  # noqa: E402


def expand_prefixes(specs: list[str]) -> list[str]:
    out: list[str] = []
    for s in specs:
        s = s[: -len(".idx")] if s.endswith((".idx", ".bin")) else s
        if glob.has_magic(s):
            found = sorted(p[: -len(".idx")] for p in glob.glob(s + ".idx"))
            if not found:
                raise FileNotFoundError(f"pattern {s}.idx matches no dataset")
            out += found
        else:
            out.append(s)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes or glob patterns, merged in order")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prefixes = expand_prefixes(args.input)
        counts = merge_datasets(prefixes, args.output_prefix)
    except (FileNotFoundError, ValueError) as e:
        print(f"merge_datasets: error: {e}", file=sys.stderr)
        return 2
    print(
        f"merged {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx: {counts['sequences']:,} sequences, "
        f"{counts['documents']:,} documents, {counts['tokens']:,} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
