"""Tokenize raw text into Megatron ``.bin``/``.idx`` datasets (the library behind ``tools/preprocess_data.py``).

Inputs: ``.jsonl``/``.json`` files (one JSON object per line; ``json_keys`` name the text fields) and ``.txt`` files
(the whole file is one document). Output per key: ``f"{output_prefix}_{key}_document"`` (Megatron's naming), each
document ``tokenizer.encode(text, add_bos=True)`` (+ ``</s>`` with ``append_eod``), one sequence per document.

Bad input is skipped and reported with file and line (``strict=True`` raises instead): a line that is not UTF-8, not
valid JSON or not an object skips the line for every key; a missing, non-string or empty (whitespace-only) field
skips that key's document only. Blank lines are ignored silently.

``workers > 1`` tokenizes in a ``multiprocessing`` pool (spawned: no fork after the Rust tokenizer's threads exist);
results come back in input order, so the output is byte-identical to ``workers=1``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from megatron_dual.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_dual.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["preprocess", "output_prefix_for", "JSONL_SUFFIXES", "TXT_SUFFIXES"]

JSONL_SUFFIXES = (".jsonl", ".json")
TXT_SUFFIXES = (".txt",)
_BATCH_LINES = 256  # lines per unit of work sent to a worker
_BATCH_BYTES = 4 << 20

# (file, line, kind, raw bytes); kind is "jsonl" or "txt"
Item = tuple[str, int, str, bytes]
# per item: (file, line, [(key, ids or None, reason or None) ...]); a line-level failure gives [(None, None, reason)]
Result = tuple[str, int, list[tuple[str | None, np.ndarray | None, str | None]]]

_worker: dict[str, Any] = {}


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _init_worker(tokenizer_spec: str, json_keys: list[str], append_eod: bool, single_thread: bool) -> None:
    if single_thread:
        # one process per core already; the Rust thread pool inside each would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer_spec)
    _worker.update(tok=tok, keys=list(json_keys), eod=append_eod, dtype=best_dtype(tok.vocab_size))


def _set_worker(tok: Tokenizer, json_keys: list[str], append_eod: bool) -> None:
    _worker.update(tok=tok, keys=list(json_keys), eod=append_eod, dtype=best_dtype(tok.vocab_size))


def _parse(item: Item, keys: list[str]) -> tuple[list[tuple[str, str | None, str | None]], str | None, int]:
    """-> ([(key, text or None, reason or None)], line-level reason or None, line to report)."""
    file, line, kind, raw = item
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if kind == "txt":  # a whole file: point at the line holding the bad byte
            line = raw.count(b"\n", 0, e.start) + 1
        return [], f"not valid UTF-8 ({e.reason} at byte {e.start})", line
    if kind == "txt":
        values: dict[str, Any] = {keys[0]: text}
    else:
        if line == 1:
            text = text.removeprefix("\ufeff")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return [], f"invalid JSON ({e.msg} at column {e.colno})", line
        if not isinstance(obj, dict):
            return [], f"not a JSON object (a {type(obj).__name__})", line
        values = obj
    out: list[tuple[str, str | None, str | None]] = []
    for key in keys:
        if key not in values:
            out.append((key, None, f"missing key {key!r}"))
            continue
        v = values[key]
        if not isinstance(v, str):
            out.append((key, None, f"key {key!r} is not a string (a {type(v).__name__})"))
        elif not v.strip():
            out.append((key, None, f"empty text in key {key!r}" if kind == "jsonl" else "empty file"))
        else:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                out.append((key, None, f"key {key!r} holds a lone surrogate (invalid Unicode)"))
                continue
            out.append((key, v, None))
    return out, None, line


def _encode_batch(items: list[Item]) -> list[Result]:
    tok: Tokenizer = _worker["tok"]
    keys: list[str] = _worker["keys"]
    parsed = [_parse(item, keys) for item in items]
    texts = [text for fields, _, _ in parsed for _, text, _ in fields if text is not None]
    encoded = iter(tok.encode_batch(texts, add_bos=True)) if texts else iter(())
    dtype = _worker["dtype"]
    results: list[Result] = []
    for (file, _, _, _), (fields, line_reason, line) in zip(items, parsed, strict=True):
        if line_reason is not None:
            results.append((file, line, [(None, None, line_reason)]))
            continue
        row: list[tuple[str | None, np.ndarray | None, str | None]] = []
        for key, text, reason in fields:
            if text is None:
                row.append((key, None, reason))
                continue
            ids = next(encoded)
            if _worker["eod"]:
                ids.append(tok.eos_id)
            row.append((key, np.asarray(ids, dtype=dtype), None))
        results.append((file, line, row))
    return results


def _read_items(inputs: list[str]) -> Iterator[list[Item]]:
    """Batches of input items, in input order; files are read as bytes so a bad line is a per-line problem."""
    batch: list[Item] = []
    size = 0
    for path in inputs:
        if path.endswith(TXT_SUFFIXES):
            with open(path, "rb") as f:
                data = f.read()
            batch.append((path, 1, "txt", data))
            size += len(data)
        else:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    batch.append((path, lineno, "jsonl", raw))
                    size += len(raw)
                    if len(batch) >= _BATCH_LINES or size >= _BATCH_BYTES:
                        yield batch
                        batch, size = [], 0
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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


def _location(file: str, line: int) -> str:
    return f"{file}:{line}"


class _Progress:
    def __init__(self, interval: int, stream: TextIO) -> None:
        self.interval = interval
        self.stream = stream
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False
        self.t0 = time.perf_counter()
        self.next_at = interval
        self.printed = False
        self.last_docs = -1

    def update(self, docs: int, tokens: int, nbytes: int, force: bool = False) -> None:
        if self.interval <= 0 or docs == self.last_docs or (docs < self.next_at and not force):
            return
        self.last_docs = docs
        self.next_at = (docs // self.interval + 1) * self.interval
        dt = max(time.perf_counter() - self.t0, 1e-9)
        msg = f"processed {docs:,} documents, {tokens:,} tokens ({docs / dt:,.0f} docs/s, {nbytes / dt / 1e6:.2f} MB/s)"
        self.stream.write(("\r" + msg) if self.tty else msg + "\n")
        self.stream.flush()
        self.printed = True

    def close(self) -> None:
        if self.printed and self.tty:
            self.stream.write("\n")
            self.stream.flush()


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
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``f"{output_prefix}_{key}_document.bin/.idx"`` for each of ``json_keys``.

    Returns a summary: ``documents`` and ``tokens`` (over all keys), ``per_key`` ({key: {documents, tokens,
    prefix}}), ``skipped`` (list of ``(file, line, reason)``), ``dtype``, ``tokenizer`` (path), ``seconds``.
    Raises FileNotFoundError for a missing input or tokenizer, ValueError for an unsupported input type and, with
    ``strict``, for the first bad line (naming ``file:line`` and the reason); no ``.idx`` is written then.
    Progress goes to ``log_stream`` (default stderr) every ``log_interval`` documents; 0 disables it.
    """
    keys = list(json_keys) if json_keys else ["text"]
    if len(set(keys)) != len(keys):
        raise ValueError(f"json_keys {keys} repeats a key")
    if workers < 1:
        raise ValueError(f"workers = {workers}: must be >= 1")
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
        if not path.endswith(JSONL_SUFFIXES + TXT_SUFFIXES):
            raise ValueError(f"{path}: unsupported input type (expected .jsonl / .json lines or .txt)")
        if path.endswith(TXT_SUFFIXES) and len(keys) > 1:
            raise ValueError(
                f"{path}: a .txt file is one document with no keys, but json_keys has {len(keys)} keys {keys}; "
                f"preprocess .txt inputs with a single key"
            )
    tok = load_tokenizer(tokenizer)
    dtype = best_dtype(tok.vocab_size)
    prefixes = {k: output_prefix_for(output_prefix, k) for k in keys}
    per_key = {k: {"documents": 0, "tokens": 0, "prefix": prefixes[k]} for k in keys}
    skipped: list[tuple[str, int, str]] = []
    progress = _Progress(log_interval, log_stream if log_stream is not None else sys.stderr)
    t0 = time.perf_counter()
    nbytes = 0

    def handle(results: list[Result], writers: dict[str, IndexedDatasetWriter]) -> None:
        nonlocal nbytes
        for file, line, row in results:
            for key, ids, reason in row:
                if reason is not None:
                    if strict:
                        raise ValueError(f"{_location(file, line)}: {reason}")
                    skipped.append((file, line, reason))
                    continue
                assert key is not None and ids is not None
                writers[key].add_document(ids)
                per_key[key]["documents"] += 1
                per_key[key]["tokens"] += int(ids.size)
                nbytes += ids.nbytes
        progress.update(sum(v["documents"] for v in per_key.values()), sum(v["tokens"] for v in per_key.values()),
                        nbytes)

    with contextlib.ExitStack() as stack:
        writers = {k: stack.enter_context(IndexedDatasetWriter(prefixes[k], dtype)) for k in keys}
        if workers == 1:
            _set_worker(tok, keys, append_eod)
            for batch in _read_items(inputs):
                handle(_encode_batch(batch), writers)
        else:
            throttle = _Throttle(4 * workers)
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.path, keys, append_eod, True))
            try:
                for results in pool.imap(_encode_batch, throttle.wrap(_read_items(inputs)), chunksize=1):
                    throttle.release()
                    handle(results, writers)
                pool.close()
            finally:
                throttle.stopped = True
                pool.terminate()
                pool.join()
    progress.update(sum(v["documents"] for v in per_key.values()), sum(v["tokens"] for v in per_key.values()),
                    nbytes, force=progress.printed)
    progress.close()
    return {
        "documents": sum(v["documents"] for v in per_key.values()),
        "tokens": sum(v["tokens"] for v in per_key.values()),
        "per_key": per_key,
        "skipped": skipped,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok.path,
        "seconds": time.perf_counter() - t0,
    }
