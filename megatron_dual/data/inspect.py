"""Summaries of a ``.bin``/``.idx`` dataset: header, counts, length statistics, token histogram, decoded documents
(the library behind ``tools/inspect_dataset.py``)."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from megatron_dual.data.indexed import IndexedDataset, data_file_path, index_file_path

__all__ = ["describe", "token_histogram", "format_description"]


def token_histogram(ds: IndexedDataset, max_tokens: int = 100_000_000, chunk: int = 1 << 24) -> tuple[np.ndarray, int]:
    """Counts per token id over the whole ``.bin`` (or, when it holds more than ``max_tokens``, over evenly spaced
    chunks totalling about ``max_tokens``). Returns (counts, tokens counted)."""
    total = ds.num_tokens
    counts = np.zeros(0, dtype=np.int64)
    if total == 0:
        return counts, 0
    n_chunks = max(1, -(-min(total, max_tokens) // chunk))
    starts = [0] if total <= chunk else np.linspace(0, total - min(chunk, total), n_chunks).astype(np.int64).tolist()
    if total <= max_tokens:
        starts = list(range(0, total, chunk))
    seen = 0
    for s in starts:
        n = min(chunk, total - int(s))
        arr = ds.read_stream(int(s), n).astype(np.int64)
        c = np.bincount(arr)
        if c.size > counts.size:
            c[: counts.size] += counts
            counts = c
        else:
            counts[: c.size] += c
        seen += n
    return counts, seen


def describe(prefix: str, top: int = 20, max_tokens: int = 100_000_000) -> dict[str, Any]:
    """Header fields, counts, document-length statistics and the ``top`` most frequent token ids."""
    ds = IndexedDataset(prefix)
    with open(index_file_path(prefix), "rb") as f:
        head = f.read(34)
    lengths = ds.sequence_lengths.astype(np.int64)
    counts, seen = token_histogram(ds, max_tokens=max_tokens)
    order = np.argsort(-counts, kind="stable")[:top] if counts.size else np.zeros(0, np.int64)
    pct = np.percentile(lengths, [50, 90, 99]).tolist() if lengths.size else [0, 0, 0]
    return {
        "prefix": prefix,
        "magic": head[:9],
        "version": struct.unpack_from("<Q", head, 9)[0],
        "dtype_code": head[17],
        "dtype": np.dtype(ds.dtype).name,
        "sequences": len(ds),
        "documents": len(ds.document_indices) - 1,
        "tokens": ds.num_tokens,
        "idx_bytes": os.path.getsize(index_file_path(prefix)),
        "bin_bytes": os.path.getsize(data_file_path(prefix)),
        "length_min": int(lengths.min()) if lengths.size else 0,
        "length_mean": float(lengths.mean()) if lengths.size else 0.0,
        "length_max": int(lengths.max()) if lengths.size else 0,
        "length_p50_p90_p99": pct,
        "empty_sequences": int((lengths == 0).sum()),
        "histogram_tokens": seen,
        "distinct_ids": int((counts > 0).sum()),
        "max_id": int(np.nonzero(counts)[0][-1]) if counts.any() else -1,
        "top": [(int(i), int(counts[i])) for i in order if counts[i] > 0],
    }


def format_description(info: dict[str, Any], id_to_token: Any = None) -> str:
    lines = [
        f"{info['prefix']}: magic {info['magic']!r} version {info['version']} dtype code {info['dtype_code']} "
        f"({info['dtype']})",
        f"  sequences {info['sequences']:,}  documents {info['documents']:,}  tokens {info['tokens']:,}  "
        f"(.idx {info['idx_bytes']:,} B, .bin {info['bin_bytes']:,} B)",
        f"  tokens/sequence: min {info['length_min']:,}  mean {info['length_mean']:,.1f}  max {info['length_max']:,}  "
        f"p50/p90/p99 {'/'.join(f'{x:,.0f}' for x in info['length_p50_p90_p99'])}  empty {info['empty_sequences']:,}",
        f"  histogram over {info['histogram_tokens']:,} tokens: {info['distinct_ids']:,} distinct ids, max id "
        f"{info['max_id']:,}",
    ]
    total = max(info["histogram_tokens"], 1)
    for i, c in info["top"]:
        name = f" {id_to_token(i)!r}" if id_to_token is not None else ""
        lines.append(f"    {i:>7}{name}: {c:,} ({100.0 * c / total:.2f}%)")
    return "\n".join(lines)
