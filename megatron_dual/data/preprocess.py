"""Tokenize raw text into Megatron ``.bin``/``.idx`` datasets (the library behind ``tools/preprocess_data.py``).

Inputs (files, directories searched recursively, or glob patterns), each optionally compressed ``.gz`` / ``.zst``:

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line; ``json_keys`` name the text fields;
* ``.txt``: the whole file is one document (``txt_mode="file"``) or every blank-line-separated block is one
  (``txt_mode="blank-line"``);
* ``.parquet``: one document per row of the ``json_keys`` columns (read in record batches).

Output per key: ``f"{output_prefix}_{key}_document"`` (Megatron's naming; with ``partitions=K`` the K shards
``..._document_000`` ...), each document ``[<s>] + encode(text) [+ </s>]``, one sequence per document, in the
smallest dtype holding the vocabulary. Files are written under temporary names and renamed at the end, so an
interrupted run never leaves a complete-looking ``.idx``.

Bad input is skipped and counted with file and line (``strict=True`` raises at the first, naming it): a line that is
not UTF-8, not valid JSON or not an object (the whole line), a missing / non-string / empty field (that key's
document), an empty file or block, a truncated or corrupt compressed stream (the rest of that file). Blank lines are
ignored silently.

Reading and decompression stream in the main process, in batches of at most ``_BATCH_LINES`` lines / ``_BATCH_BYTES``
bytes; ``workers > 1`` parses and tokenizes batches in a spawned ``multiprocessing`` pool with a bounded number of
batches in flight, and results are written in input order, so memory is bounded by a constant and the output is
byte-identical for any number of workers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from megatron_dual.data.encoders import SPECIAL_TOKEN_MODES, TextEncoder, load_encoder
from megatron_dual.data.indexed import IndexedDatasetWriter, best_dtype

__all__ = [
    "preprocess",
    "output_prefix_for",
    "expand_inputs",
    "input_format",
    "iter_documents",
    "JSONL_SUFFIXES",
    "TXT_SUFFIXES",
    "PARQUET_SUFFIXES",
    "TXT_MODES",
    "SPECIAL_TOKEN_MODES",
]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".zst")
TXT_MODES = ("file", "blank-line")
_BATCH_LINES = 512  # lines per unit of work sent to a worker
_BATCH_BYTES = 2 << 20
_READ_CHUNK = 1 << 20
_MAX_SKIP_RECORDS = 1000  # skipped-line locations kept for the summary (counts are always complete)
_KEYS_SEEN_ITEMS = 1000  # JSON objects read back to name the keys the input has when a key produced no document

# (file, line, kind, payload): kind "jsonl" (raw line bytes), "txt" (raw document bytes), "record" (dict of values
# from a parquet row) or "error" (payload: the reason, a str; the rest of the file could not be read)
Item = tuple[str, int, str, Any]

_worker: dict[str, Any] = {}


def output_prefix_for(output_prefix: str, key: str, partition: int | None = None) -> str:
    base = f"{output_prefix}_{key}_document"
    return base if partition is None else f"{base}_{partition:03d}"


# ------------------------------------------------------------------------------------------------------ inputs
def input_format(path: str) -> tuple[str, str | None]:
    """-> (format, compression): format in ``jsonl | txt | parquet``, compression ``gz | zst | None``.
    ValueError naming the file for anything else."""
    base, comp = path, None
    for suf in COMPRESSION_SUFFIXES:
        if path.endswith(suf):
            base, comp = path[: -len(suf)], suf[1:]
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl", comp
    if base.endswith(TXT_SUFFIXES):
        return "txt", comp
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet", comp
    raise ValueError(
        f"{path}: unsupported input type (expected .jsonl/.json/.ndjson, .txt or .parquet, optionally .gz or .zst)"
    )


def _supported(path: str) -> bool:
    try:
        input_format(path)
        return True
    except ValueError:
        return False


def expand_inputs(specs: list[str]) -> list[str]:
    """Files as given, directories walked recursively (supported files only, sorted), glob patterns expanded
    (sorted). Raises FileNotFoundError for a path or pattern that matches nothing; duplicates are dropped."""
    out: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if _supported(f)]
            if not found:
                raise FileNotFoundError(f"{spec}: directory holds no .jsonl/.txt/.parquet(.gz/.zst) files")
            out += sorted(found)
        elif os.path.isfile(spec):
            out.append(spec)
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input pattern matches no file: {spec}")
            out += found
        else:
            raise FileNotFoundError(f"input file not found: {spec}")
    seen: set[str] = set()
    unique = []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


class _Source:
    """Decompressed chunks of one file; ``raw_pos`` is how far into the file (on-disk bytes) reading has got.
    Truncated streams raise EOFError, corrupt ones ValueError, both naming the compression."""

    def __init__(self, path: str, compression: str | None) -> None:
        self.path = path
        self.compression = compression
        self.raw_pos = 0

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            if self.compression is None:
                while chunk := f.read(_READ_CHUNK):
                    self.raw_pos += len(chunk)
                    yield chunk
                return
            if self.compression == "gz":
                # wbits=47: gzip header; members concatenated one after another are read in turn
                yield from self._decompress(
                    f,
                    lambda: zlib.decompressobj(wbits=47),
                    zlib.error,
                    "gz",
                    "compressed data ended before the end-of-stream marker",
                )
            else:
                import zstandard

                dctx = zstandard.ZstdDecompressor()
                yield from self._decompress(
                    f, dctx.decompressobj, zstandard.ZstdError, "zst", "compressed data ended inside a frame"
                )

    def _decompress(self, f, new_decompressor, error: type[Exception], name: str, truncated: str) -> Iterator[bytes]:
        """Streamed decompression of concatenated frames/members with a fresh decompressor per frame."""
        d = new_decompressor()
        started = False
        while True:
            raw = f.read(_READ_CHUNK)
            self.raw_pos += len(raw)
            if not raw:
                if started and not d.eof:
                    raise EOFError(f"truncated .{name} stream ({truncated})")
                return
            while raw:
                started = True
                try:
                    out = d.decompress(raw)
                except error as e:
                    raise ValueError(f"corrupt .{name} stream ({e})") from e
                if out:
                    yield out
                if d.eof:
                    raw = d.unused_data
                    d = new_decompressor()
                    started = bool(raw)
                else:
                    raw = b""


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (with their newline) from a stream of chunks; the last may lack one."""
    tail = b""
    for chunk in chunks:
        if tail:
            chunk = tail + chunk
        parts = chunk.split(b"\n")
        tail = parts.pop()
        for p in parts:
            yield p + b"\n"
    if tail:
        yield tail


class _CountedLines:
    """``_lines`` of a source, counting them as they are read: after an error ``count`` is the last line read whole."""

    def __init__(self, src: _Source) -> None:
        self._src = src
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for raw in _lines(self._src.chunks()):
            self.count += 1
            yield raw


def _blank_line_blocks(path: str, lines: _CountedLines) -> Iterator[tuple[Item, int]]:
    """One ``txt`` item per blank-line-separated block, numbered by its first line."""
    block: list[bytes] = []
    start = 0
    for raw in lines:
        if raw.strip():
            if not block:
                start = lines.count
            block.append(raw)
        elif block:
            data = b"".join(block)
            yield (path, start, "txt", data), len(data)
            block = []
    if block:
        data = b"".join(block)
        yield (path, start, "txt", data), len(data)


def _jsonl_lines(path: str, lines: _CountedLines) -> Iterator[tuple[Item, int]]:
    """One ``jsonl`` item per non-blank line."""
    for raw in lines:
        if raw.strip():
            yield (path, lines.count, "jsonl", raw), len(raw)


class _Reader:
    """Yields batches of items from all inputs, in order; tracks on-disk bytes read for progress/ETA."""

    def __init__(self, inputs: list[str], keys: list[str], txt_mode: str) -> None:
        self.inputs = inputs
        self.keys = keys
        self.txt_mode = txt_mode
        self.total_bytes = sum(os.path.getsize(p) for p in inputs)
        self._done_bytes = 0
        self._current: _Source | None = None

    @property
    def bytes_read(self) -> int:
        return self._done_bytes + (self._current.raw_pos if self._current is not None else 0)

    def batches(self) -> Iterator[list[Item]]:
        batch: list[Item] = []
        size = 0
        for path in self.inputs:
            for item, nbytes in self._items(path):
                batch.append(item)
                size += nbytes
                if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
            self._done_bytes += os.path.getsize(path)
            self._current = None
        if batch:
            yield batch

    def _items(self, path: str) -> Iterator[tuple[Item, int]]:
        fmt, comp = input_format(path)
        if fmt == "parquet":
            yield from self._parquet(path, comp)
            return
        src = _Source(path, comp)
        self._current = src
        lines = _CountedLines(src)
        try:
            if fmt == "txt" and self.txt_mode == "file":
                data = b"".join(src.chunks())
                yield (path, 1, "txt", data), len(data)
            elif fmt == "txt":
                yield from _blank_line_blocks(path, lines)
            else:
                yield from _jsonl_lines(path, lines)
        except (EOFError, ValueError) as e:
            yield (path, lines.count + 1, "error", str(e)), 0

    def _parquet(self, path: str, comp: str | None) -> Iterator[tuple[Item, int]]:
        import pyarrow.parquet as pq

        tmp = None
        try:
            if comp is not None:  # parquet needs random access: decompress to a temporary file first
                src = _Source(path, comp)
                fd, tmp = tempfile.mkstemp(suffix=".parquet")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in src.chunks():
                            out.write(chunk)
                except (EOFError, ValueError) as e:
                    yield (path, 1, "error", str(e)), 0
                    return
            try:
                pf = pq.ParquetFile(tmp or path)
            except Exception as e:  # pyarrow raises ArrowInvalid and friends
                yield (path, 1, "error", f"not a readable parquet file ({e})"), 0
                return
            names = pf.schema_arrow.names
            missing = [k for k in self.keys if k not in names]
            if missing:
                raise ValueError(f"{path}: parquet file has no column {missing[0]!r} (columns: {', '.join(names)})")
            row = 0
            for rb in pf.iter_batches(batch_size=1024, columns=self.keys):
                cols = [rb.column(k).to_pylist() for k in self.keys]
                for values in zip(*cols, strict=True):
                    row += 1
                    rec = dict(zip(self.keys, values, strict=True))
                    yield (path, row, "record", rec), sum(len(v) for v in values if isinstance(v, str))
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


# ------------------------------------------------------------------------------------------------------ workers
def _init_worker(
    tokenizer_spec: str,
    json_keys: list[str],
    add_bos: bool,
    append_eod: bool,
    single_thread: bool,
    fast: bool = True,
    special_tokens: str = "text",
) -> None:
    if single_thread:
        # one process per core already; the Rust thread pool inside each would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    _set_worker(load_encoder(tokenizer_spec, fast=fast, special_tokens=special_tokens), json_keys, add_bos, append_eod)


def _set_worker(enc: TextEncoder, json_keys: list[str], add_bos: bool, append_eod: bool) -> None:
    _worker.update(
        enc=enc,
        keys=list(json_keys),
        bos=enc.bos_id if add_bos else None,
        eod=enc.eos_id if append_eod else None,
        dtype=best_dtype(enc.vocab_size),
    )


def _decode(kind: str, payload: bytes, line: int, keys: list[str]) -> tuple[dict[str, Any] | None, str | None, int]:
    """The values of a ``jsonl`` / ``txt`` item -> (values or None, reason when None, line to report)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        if kind == "txt":  # a whole file or block: point at the line holding the bad byte
            line += payload.count(b"\n", 0, e.start)
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})", line
    if kind == "txt":
        return {keys[0]: text}, None, line
    if line == 1:
        text = text.removeprefix("\ufeff")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})", line
    if not isinstance(obj, dict):
        return None, f"not a JSON object (a {type(obj).__name__})", line
    return obj, None, line


def _field(key: str, values: dict[str, Any], kind: str, line: int) -> tuple[str, str | None, str | None]:
    """(key, text, None) for a usable field, else (key, None, reason)."""
    if key not in values:
        return (key, None, f"missing key {key!r}")
    v = values[key]
    if v is None and kind == "record":
        return (key, None, f"null value in column {key!r}")
    if not isinstance(v, str):
        return (key, None, f"key {key!r} is not a string (a {type(v).__name__})")
    if not v.strip():
        what = {"jsonl": f"empty text in key {key!r}", "record": f"empty text in column {key!r}"}
        return (key, None, what.get(kind, "empty file" if line == 1 else "empty document"))
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return (key, None, f"key {key!r} holds a lone surrogate (invalid Unicode)")
    return (key, v, None)


def _parse(item: Item, keys: list[str]) -> tuple[list[tuple[str, str | None, str | None]], str | None, int]:
    """-> ([(key, text or None, reason or None)], line-level reason or None, line to report)."""
    file, line, kind, payload = item
    if kind == "error":
        return [], payload, line
    if kind == "record":
        values: dict[str, Any] = payload
    else:
        decoded, reason, line = _decode(kind, payload, line, keys)
        if decoded is None:
            return [], reason, line
        values = decoded
    return [_field(key, values, kind, line) for key in keys], None, line


# per batch: (skips [(file, line, reason)], {key: (tokens, lengths)}, bytes of text encoded)
BatchResult = tuple[list[tuple[str, int, str]], dict[str, tuple[np.ndarray, np.ndarray]], int]


def _encode_batch(items: list[Item]) -> BatchResult:
    enc: TextEncoder = _worker["enc"]
    keys: list[str] = _worker["keys"]
    bos, eod, dtype = _worker["bos"], _worker["eod"], _worker["dtype"]
    skips: list[tuple[str, int, str]] = []
    texts: dict[str, list[str]] = {k: [] for k in keys}
    nbytes = 0
    for item in items:
        fields, line_reason, line = _parse(item, keys)
        if line_reason is not None:
            skips.append((item[0], line, line_reason))
            continue
        for key, text, reason in fields:
            if text is None:
                skips.append((item[0], line, reason or "unknown"))
            else:
                texts[key].append(text)
                nbytes += len(text)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    extra = (bos is not None) + (eod is not None)
    for key in keys:
        docs = enc.encode_many(texts[key]) if texts[key] else []
        lengths = np.fromiter((len(d) + extra for d in docs), dtype=np.int64, count=len(docs))
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        pos = 0
        for d in docs:
            if bos is not None:
                flat[pos] = bos
                pos += 1
            n = len(d)
            flat[pos : pos + n] = d
            pos += n
            if eod is not None:
                flat[pos] = eod
                pos += 1
        out[key] = (flat, lengths)
    return skips, out, nbytes


class _Throttle:
    """Bounds how far ``Pool.imap``'s feeder thread reads ahead (it would otherwise read every input into memory)."""

    def __init__(self, limit: int) -> None:
        self._sem = threading.Semaphore(limit)
        self.stopped = False

    def wrap(self, it: Iterator[list[Item]]) -> Iterator[list[Item]]:
        for x in it:
            while not self._sem.acquire(timeout=0.05):
                if self.stopped:
                    return
            if self.stopped:
                return
            yield x

    def release(self) -> None:
        self._sem.release()


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds < 0 or seconds > 1e7:
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Progress:
    """One line every ``interval`` documents: documents, tokens, docs/s, MB/s of input, ETA from bytes read."""

    def __init__(self, interval: int, stream: TextIO, total_bytes: int) -> None:
        self.interval = interval
        self.stream = stream
        self.total = total_bytes
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False
        self.t0 = time.perf_counter()
        self.next_at = interval
        self.printed = False
        self.last_docs = -1

    def update(self, docs: int, tokens: int, bytes_read: int, force: bool = False) -> None:
        if self.interval <= 0 or docs == self.last_docs or (docs < self.next_at and not force):
            return
        self.last_docs = docs
        self.next_at = (docs // self.interval + 1) * self.interval
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rate = bytes_read / dt
        pct = 100.0 * bytes_read / self.total if self.total else 100.0
        eta = (self.total - bytes_read) / rate if rate > 0 else float("nan")
        msg = (
            f"processed {docs:,} documents, {tokens:,} tokens ({docs / dt:,.0f} docs/s, {tokens / dt:,.0f} tok/s, "
            f"{rate / 1e6:.2f} MB/s) {pct:5.1f}% ETA {_fmt_eta(eta)}"
        )
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        self.stream.flush()
        self.printed = True

    def close(self) -> None:
        if self.printed and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _check_options(inputs: list[str], keys: list[str], workers: int, partitions: int, txt_mode: str) -> None:
    if len(set(keys)) != len(keys):
        raise ValueError(f"json_keys {keys} repeats a key")
    if workers < 1:
        raise ValueError(f"workers = {workers}: must be >= 1")
    if partitions < 1:
        raise ValueError(f"partitions = {partitions}: must be >= 1")
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode = {txt_mode!r}: must be one of {', '.join(TXT_MODES)}")
    if not inputs:
        raise ValueError("no input files given")


def _check_txt_keys(files: list[str], keys: list[str]) -> None:
    for path in files:
        fmt, _ = input_format(path)
        if fmt == "txt" and len(keys) > 1:
            raise ValueError(
                f"{path}: a .txt file is one document with no keys, but json_keys has {len(keys)} keys {keys}; "
                f"preprocess .txt inputs with a single key"
            )


def _load_checked_encoder(
    tokenizer: str, fast: bool, add_bos: bool, append_eod: bool, special_tokens: str = "text"
) -> TextEncoder:
    """The encoder, refused when it lacks the BOS / EOS token that was asked for."""
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"special_tokens = {special_tokens!r}: must be one of {', '.join(SPECIAL_TOKEN_MODES)}")
    enc = load_encoder(tokenizer, fast=fast, special_tokens=special_tokens)
    if add_bos and enc.bos_id is None:
        raise ValueError(
            f"tokenizer {tokenizer}: has no BOS token (looked for <s>, <|begin_of_text|>, ...): "
            f"pass add_bos=False (--no-bos)"
        )
    if append_eod and enc.eos_id is None:
        raise ValueError(
            f"tokenizer {tokenizer}: has no EOS token (looked for </s>, <|endoftext|>, ...): "
            f"drop append_eod (--append-eod)"
        )
    return enc


def _add_to_shards(ws: list[IndexedDatasetWriter], flat: np.ndarray, lengths: np.ndarray, first: int) -> None:
    """Write a batch of documents, dealt round-robin over the shards ``ws`` from document number ``first`` on."""
    if len(ws) == 1:
        ws[0].add_documents(flat, lengths)
        return
    shard = (first + np.arange(lengths.size)) % len(ws)
    tok_shard = np.repeat(shard, lengths)
    for p, w in enumerate(ws):
        sel = shard == p
        if sel.any():
            w.add_documents(flat[tok_shard == p], lengths[sel])


class _Collector:
    """Takes batch results in input order: records skips (raising at the first with ``strict``), writes documents,
    keeps the per-key and total counts and reports progress."""

    def __init__(self, per_key: dict[str, dict[str, Any]], strict: bool, progress: _Progress, reader: _Reader) -> None:
        self.per_key = per_key
        self.strict = strict
        self.progress = progress
        self.reader = reader
        self.skipped: list[tuple[str, int, str]] = []
        self.by_reason: Counter[str] = Counter()
        self.totals = {"documents": 0, "tokens": 0}

    def _skip(self, skips: list[tuple[str, int, str]]) -> None:
        for file, line, reason in skips:
            if self.strict:
                raise ValueError(f"{file}:{line}: {reason}")
            self.by_reason[reason.split(" (", 1)[0]] += 1
            if len(self.skipped) < _MAX_SKIP_RECORDS:
                self.skipped.append((file, line, reason))

    def handle(self, result: BatchResult, writers: dict[str, list[IndexedDatasetWriter]]) -> None:
        skips, out, _ = result
        self._skip(skips)
        for key, (flat, lengths) in out.items():
            if not lengths.size:
                continue
            _add_to_shards(writers[key], flat, lengths, self.per_key[key]["documents"])
            self.per_key[key]["documents"] += int(lengths.size)
            self.per_key[key]["tokens"] += int(lengths.sum())
            self.totals["documents"] += int(lengths.size)
            self.totals["tokens"] += int(lengths.sum())
        self.progress.update(self.totals["documents"], self.totals["tokens"], self.reader.bytes_read)


def _encode_in_process(
    reader: _Reader,
    collector: _Collector,
    writers: dict[str, list[IndexedDatasetWriter]],
    enc: TextEncoder,
    keys: list[str],
    add_bos: bool,
    append_eod: bool,
) -> None:
    _set_worker(enc, keys, add_bos, append_eod)
    try:
        for batch in reader.batches():
            collector.handle(_encode_batch(batch), writers)
    finally:
        _worker.clear()


def _encode_in_pool(
    reader: _Reader,
    collector: _Collector,
    writers: dict[str, list[IndexedDatasetWriter]],
    enc: TextEncoder,
    keys: list[str],
    add_bos: bool,
    append_eod: bool,
    workers: int,
) -> None:
    """Batches encoded by a spawned pool of ``workers``, at most ``2 * workers`` in flight, handled in input order."""
    throttle = _Throttle(2 * workers)
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(
        workers,
        initializer=_init_worker,
        initargs=(
            enc.spec,
            keys,
            add_bos,
            append_eod,
            True,
            enc.kind == "hf-ltg-fast",
            getattr(enc, "special_tokens", "text"),
        ),
    )
    try:
        for result in pool.imap(_encode_batch, throttle.wrap(reader.batches()), chunksize=1):
            throttle.release()
            collector.handle(result, writers)
        pool.close()
    finally:
        throttle.stopped = True
        pool.terminate()
        pool.join()


def _keys_seen(files: list[str], keys: list[str], txt_mode: str) -> list[str]:
    """The keys of the first ``_KEYS_SEEN_ITEMS`` JSON objects of ``files``, in order of first appearance."""
    seen: dict[str, None] = {}
    n = 0
    for batch in _Reader(files, keys, txt_mode).batches():
        for _, line, kind, payload in batch:
            if kind == "jsonl":
                values, _, _ = _decode(kind, payload, line, keys)
                seen.update(dict.fromkeys(values or {}))
            n += 1
            if n >= _KEYS_SEEN_ITEMS:
                return list(seen)
    return list(seen)


def _check_documents(collector: _Collector, keys: list[str], files: list[str], reader: _Reader, txt_mode: str) -> None:
    """ValueError (one line) when a key produced no document: an empty input or a key no record has."""
    empty = [k for k in keys if collector.per_key[k]["documents"] == 0]
    if not empty:
        return
    where = f"{len(files)} input file(s), {reader.total_bytes:,} bytes"
    skipped = ", ".join(f"{r}: {n:,}" for r, n in collector.by_reason.most_common(3))
    skipped = f"; skipped {skipped}" if skipped else ""
    if collector.totals["documents"] == 0 and not collector.by_reason:
        raise ValueError(f"no documents in the input ({where}: empty or only blank lines); nothing written")
    seen = _keys_seen(files, keys, txt_mode)
    seen_s = ", ".join(map(repr, seen)) if seen else "none (no JSON object could be read)"
    raise ValueError(
        f"no documents for json key(s) {', '.join(map(repr, empty))} ({where}): asked for --json-keys "
        f"{' '.join(keys)}, keys seen in the input: {seen_s}{skipped}; nothing written"
    )


def _summary(
    collector: _Collector, dtype: type[np.number], enc: TextEncoder, files: list[str], reader: _Reader, t0: float
) -> dict[str, Any]:
    """``preprocess``'s return value (see its docstring)."""
    return {
        "documents": collector.totals["documents"],
        "tokens": collector.totals["tokens"],
        "per_key": collector.per_key,
        "skipped": collector.skipped,
        "skipped_total": sum(collector.by_reason.values()),
        "skipped_by_reason": dict(collector.by_reason),
        "dtype": np.dtype(dtype).name,
        "tokenizer": enc.spec,
        "encoder": enc.kind,
        "input_files": len(files),
        "input_bytes": reader.total_bytes,
        "seconds": time.perf_counter() - t0,
    }


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str,
    json_keys: list[str] | None = None,
    workers: int = 1,
    append_eod: bool = False,
    strict: bool = False,
    log_interval: int = 10000,
    log_stream: TextIO | None = None,
    add_bos: bool = True,
    txt_mode: str = "file",
    partitions: int = 1,
    fast_tokenizer: bool = True,
    special_tokens: str = "text",
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``f"{output_prefix}_{key}_document.bin/.idx"`` for each of ``json_keys``.

    ``inputs``: files, directories or glob patterns (see the module docstring). ``add_bos`` prepends the tokenizer's
    BOS (``<s>``), ``append_eod`` appends its EOS (``</s>``, Megatron's ``--append-eod``). ``partitions=K`` deals
    documents round-robin into K shards per key. ``fast_tokenizer=False`` forces the tokenizer library's own encode
    (same ids, slower). ``special_tokens``: ``"text"`` (default) encodes special-token strings inside a text (a
    literal ``<s>``) as text, ``"special"`` maps them to their ids as the ``tokenizers`` library's ``encode`` does.

    Returns a summary: ``documents`` and ``tokens`` (over all keys), ``per_key`` ({key: {documents, tokens,
    prefix, prefixes}}), ``skipped`` (up to 1000 ``(file, line, reason)``), ``skipped_total``, ``skipped_by_reason``
    ({reason kind: count}), ``dtype``, ``tokenizer``, ``encoder``, ``input_bytes``, ``seconds``.
    Raises FileNotFoundError for a missing input or tokenizer, ValueError for an unsupported input type and, with
    ``strict``, for the first bad line (naming ``file:line`` and the reason), and when a key produced no document
    (an empty input or a key no record has; the message names the keys seen); no ``.idx`` is written then.
    Progress goes to ``log_stream`` (default stderr) every ``log_interval`` documents; 0 disables it.
    """
    keys = list(json_keys) if json_keys else ["text"]
    _check_options(inputs, keys, workers, partitions, txt_mode)
    files = expand_inputs(list(inputs))
    _check_txt_keys(files, keys)
    enc = _load_checked_encoder(tokenizer, fast_tokenizer, add_bos, append_eod, special_tokens)
    dtype = best_dtype(enc.vocab_size)
    parts: list[int | None] = [None] if partitions == 1 else list(range(partitions))
    prefixes = {k: [output_prefix_for(output_prefix, k, p) for p in parts] for k in keys}
    per_key: dict[str, dict[str, Any]] = {
        k: {"documents": 0, "tokens": 0, "prefix": prefixes[k][0], "prefixes": prefixes[k]} for k in keys
    }
    reader = _Reader(files, keys, txt_mode)
    progress = _Progress(log_interval, log_stream if log_stream is not None else sys.stderr, reader.total_bytes)
    t0 = time.perf_counter()
    collector = _Collector(per_key, strict, progress, reader)
    totals = collector.totals

    with contextlib.ExitStack() as stack:
        writers = {k: [stack.enter_context(IndexedDatasetWriter(p, dtype)) for p in prefixes[k]] for k in keys}
        if workers == 1:
            _encode_in_process(reader, collector, writers, enc, keys, add_bos, append_eod)
        else:
            _encode_in_pool(reader, collector, writers, enc, keys, add_bos, append_eod, workers)
        _check_documents(collector, keys, files, reader, txt_mode)  # raising here removes the temporaries
        everything = [w for k in keys for w in writers[k]]
        for w in everything:  # all durable under temporary names before any is renamed: a full disk replaces none
            w.prepare()
        for w in everything:
            w.commit()
    progress.update(totals["documents"], totals["tokens"], reader.bytes_read, force=progress.printed)
    progress.close()
    return _summary(collector, dtype, enc, files, reader, t0)


def iter_documents(
    inputs: list[str], json_key: str = "text", txt_mode: str = "file", skipped: Counter[str] | None = None
) -> Iterator[str]:
    """Stream the texts of ``inputs`` (same formats, compression and bad-input rules as ``preprocess``, one key),
    e.g. for tokenizer training; bad items are skipped and counted by reason in ``skipped`` when given."""
    reader = _Reader(expand_inputs(list(inputs)), [json_key], txt_mode)
    for batch in reader.batches():
        for item in batch:
            fields, line_reason, _ = _parse(item, [json_key])
            if line_reason is not None:
                if skipped is not None:
                    skipped[line_reason.split(" (", 1)[0]] += 1
                continue
            for _, text, reason in fields:
                if text is not None:
                    yield text
                elif skipped is not None:
                    skipped[(reason or "unknown").split(" (", 1)[0]] += 1
