#!/usr/bin/env python
"""Tokenize .jsonl / .txt files into Megatron .bin/.idx datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --tokenizer ltg --workers 4

writes data/corpus_text_document.bin/.idx (one per --json-keys key). Flags follow Megatron's tools/preprocess_data.py
where they overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.data.preprocess import preprocess  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.json (one JSON object per line) or .txt files")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", default="ltg",
                   help="'ltg' (vendored), a tokenizer.json, or a directory holding one (default: ltg)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--append-eod", action="store_true", help="append </s> to every document")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--log-interval", type=int, default=10000, help="progress every N documents (0: off)")
    return p


def format_summary(summary: dict, max_locations: int = 3) -> str:
    lines = []
    docs, tokens = summary["documents"], summary["tokens"]
    per_doc = tokens / docs if docs else 0.0
    lines.append(f"documents: {docs:,}  tokens: {tokens:,}  tokens/doc: {per_doc:,.1f}  dtype: {summary['dtype']}  "
                 f"time: {summary['seconds']:.1f}s")
    for key, info in summary["per_key"].items():
        lines.append(f"  {key}: {info['documents']:,} documents, {info['tokens']:,} tokens -> "
                     f"{info['prefix']}.bin/.idx")
    skipped = summary["skipped"]
    if skipped:
        by_reason: dict[str, list[str]] = defaultdict(list)
        counts: Counter[str] = Counter()
        for file, line, reason in skipped:
            # group "invalid JSON (Expecting value at column 3)" with others of its kind
            kind = reason.split(" (", 1)[0]
            counts[kind] += 1
            if len(by_reason[kind]) < max_locations:
                by_reason[kind].append(f"{file}:{line}")
        lines.append(f"skipped: {len(skipped):,}")
        for kind, n in counts.most_common():
            more = ", ..." if n > len(by_reason[kind]) else ""
            lines.append(f"  {kind}: {n:,} (first at {', '.join(by_reason[kind])}{more})")
    else:
        lines.append("skipped: 0")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args.input, args.output_prefix, args.tokenizer, json_keys=args.json_keys,
                             workers=args.workers, append_eod=args.append_eod, strict=args.strict,
                             log_interval=args.log_interval)
    except (FileNotFoundError, ValueError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
