#!/usr/bin/env python
"""Tokenize .jsonl / .txt / .parquet files (optionally .gz / .zst) into Megatron .bin/.idx datasets.

    python tools/preprocess_data.py --input corpus/ --output-prefix data/corpus --tokenizer ltg --workers 4

writes data/corpus_text_document.bin/.idx (one per --json-keys key; with --partitions K the shards
data/corpus_text_document_000 ...). --input takes files, directories (searched recursively) and glob patterns. Flags
follow Megatron's tools/preprocess_data.py where they overlap.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dual.data.preprocess import SPECIAL_TOKEN_MODES, TXT_MODES, preprocess  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories or glob patterns of .jsonl/.json/.ndjson, .txt, .parquet (+ .gz/.zst)",
    )
    p.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument(
        "--tokenizer",
        "--tokenizer-model",
        dest="tokenizer",
        default="ltg",
        help="'ltg' (vendored), a tokenizer.json or a directory holding one, or a sentencepiece .model (default: ltg)",
    )
    p.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON fields / parquet columns to tokenize (default: text)"
    )
    p.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="file",
        help=".txt inputs: one document per file, or per blank-line-separated block (default: file)",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="write K shards per key, documents dealt round-robin (default: 1, one dataset)",
    )
    p.add_argument("--append-eod", action="store_true", help="append </s> (the tokenizer's EOS) to every document")
    p.add_argument(
        "--no-bos",
        dest="add_bos",
        action="store_false",
        help="do not prepend <s> (the tokenizer's BOS); this project's objectives expect it",
    )
    p.add_argument(
        "--slow-tokenizer",
        dest="fast_tokenizer",
        action="store_false",
        help="use the tokenizer library's own encode instead of the exact fast path for ltg tokenizers",
    )
    p.add_argument(
        "--special-tokens-in-text",
        dest="special_tokens",
        choices=SPECIAL_TOKEN_MODES,
        default="text",
        help="special-token strings inside a text (a literal <s>): 'text' encodes them as characters, "
        "'special' maps them to their ids like the tokenizers library's encode (default: text)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--log-interval", type=int, default=10000, help="progress every N documents (0: off)")
    return p


def format_summary(summary: dict, max_locations: int = 3) -> str:
    lines = []
    docs, tokens = summary["documents"], summary["tokens"]
    per_doc = tokens / docs if docs else 0.0
    secs = summary["seconds"]
    mb = summary.get("input_bytes", 0) / 1e6
    lines.append(
        f"documents: {docs:,}  tokens: {tokens:,}  tokens/doc: {per_doc:,.1f}  dtype: {summary['dtype']}  "
        f"time: {secs:.1f}s  input: {mb:,.1f} MB ({mb / max(secs, 1e-9):.2f} MB/s, "
        f"{tokens / max(secs, 1e-9):,.0f} tokens/s)"
    )
    for key, info in summary["per_key"].items():
        where = (
            info["prefix"]
            if len(info.get("prefixes", [])) <= 1
            else f"{info['prefixes'][0]} .. {info['prefixes'][-1]} ({len(info['prefixes'])} shards)"
        )
        lines.append(f"  {key}: {info['documents']:,} documents, {info['tokens']:,} tokens -> {where}.bin/.idx")
    counts = summary.get("skipped_by_reason")
    if counts is None:
        counts = Counter(reason.split(" (", 1)[0] for _, _, reason in summary["skipped"])
    total = summary.get("skipped_total", sum(counts.values()))
    if total:
        where: dict[str, list[str]] = defaultdict(list)
        for file, line, reason in summary["skipped"]:
            kind = reason.split(" (", 1)[0]  # "invalid JSON (Expecting value at column 3)" -> "invalid JSON"
            if len(where[kind]) < max_locations:
                where[kind].append(f"{file}:{line}")
        lines.append(f"skipped: {total:,}")
        for kind, n in Counter(counts).most_common():
            more = ", ..." if n > len(where[kind]) else ""
            lines.append(f"  {kind}: {n:,} (first at {', '.join(where[kind])}{more})")
    else:
        lines.append("skipped: 0")
    return "\n".join(lines)


def _write_error(prefix: str, e: OSError) -> str:
    """``cannot write PREFIX: [the path in the way: ]why`` (a temporary file's name says nothing to the user)."""
    why = "exists and is not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
    path = str(e.filename or "")
    return f"cannot write {prefix}: {f'{path}: ' if path and '.tmp-' not in path else ''}{why}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            strict=args.strict,
            log_interval=args.log_interval,
            add_bos=args.add_bos,
            txt_mode=args.txt_mode,
            partitions=args.partitions,
            fast_tokenizer=args.fast_tokenizer,
            special_tokens=args.special_tokens,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --output-prefix under a file, a full or read-only disk: nothing was renamed into place
        print(f"preprocess_data: error: {_write_error(args.output_prefix, e)}; nothing written", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
