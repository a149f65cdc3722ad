"""Megatron-Core's memory-mapped ``.bin``/``.idx`` token format, byte for byte.

``.bin``: the tokens of every sequence, concatenated, in one dtype.
``.idx`` (little endian)::

    b"MMIDIDX\\x00\\x00"        magic, 9 bytes
    <Q  1                       version
    <B  dtype code              1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    <Q  S                       sequence count
    <Q  D                       document-index count (= documents + 1)
    int32[S]  sequence_lengths  tokens per sequence
    int64[S]  sequence_pointers byte offset of each sequence in .bin
    int64[D]  document_indices  0, then the sequence index ending each document

We write one sequence per document (Megatron's preprocessing without sentence splitting), so
``document_indices == arange(S + 1)``. The reader accepts any valid layout, and validates every field up front so a
damaged file fails at open with the file and the field named instead of returning garbage tokens mid-training.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
from array import array
from collections.abc import Sequence
from types import TracebackType

import numpy as np

__all__ = [
    "INDEX_HEADER",
    "DTYPE_CODES",
    "CorruptIndexError",
    "data_file_path",
    "index_file_path",
    "best_dtype",
    "IndexedDatasetWriter",
    "IndexedDataset",
    "merge_datasets",
]

INDEX_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_CHUNK = 1 << 22  # sequences per validation chunk: bounds the temporary memory of the open-time checks


class CorruptIndexError(ValueError):
    """A ``.idx``/``.bin`` pair that is not a valid Megatron indexed dataset; the message names the file and field."""


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def best_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's ``DType.optimal_dtype``: uint16 when the vocabulary has fewer than 65,500 entries, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def _dtype_code(dtype: type[np.number] | np.dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt.name} has no Megatron dtype code (allowed: {names})")
    return _CODE_OF[dt]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists under another user (or not a pid we can ask about): leave its files alone
    return True


def remove_stale_temporaries(prefix: str) -> list[str]:
    """Delete ``<prefix>.bin.tmp-PID`` / ``.idx.tmp-PID`` left by a killed writer (PID no longer running on this
    machine); returns the paths removed. Temporaries of a live process, this one included, are kept."""
    removed = []
    for base in (data_file_path(prefix), index_file_path(prefix)):
        for path in glob.glob(glob.escape(base) + ".tmp-*"):
            pid = path.rsplit(".tmp-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    return removed


class IndexedDatasetWriter:
    """Writes ``<prefix>.bin`` and ``<prefix>.idx``; use as a context manager.

    Tokens go to a temporary ``.bin`` as they come; ``finalize`` (called by a clean ``with`` exit) fsyncs it, writes
    the index to a temporary name and renames ``.bin`` then ``.idx`` into place. An exception inside ``with`` removes
    the temporaries and leaves no ``.idx``, so a half-written dataset can never be opened.
    """

    def __init__(self, prefix: str, dtype: type[np.number] | np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        if self.dtype.kind == "f":
            raise ValueError(f"dtype {self.dtype.name}: token ids need an integer dtype")
        self._info = np.iinfo(self.dtype)
        parent = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(prefix)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = data_file_path(prefix) + suffix
        self._idx_tmp = index_file_path(prefix) + suffix
        self._bin = open(self._bin_tmp, "wb")  # closed in finalize/abort
        self._lengths = array("q")
        self._done = self._prepared = False

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            if not self._done:
                self.finalize()
        else:
            self.abort()

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document (one sequence). Ids outside the dtype's range raise ValueError (no silent wrap)."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: add_document after finalize/abort")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size and arr.dtype != self.dtype:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(
                    f"token id {lo if lo < self._info.min else hi} does not fit {self.dtype.name} "
                    f"[{self._info.min}, {self._info.max}] (use best_dtype(vocab_size))"
                )
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {arr.size} tokens does not fit the format's int32 length")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(arr.size)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append ``lengths.size`` documents whose tokens lie concatenated in ``tokens`` (already in this writer's
        dtype, so no range check is needed); one write, the bulk path of the preprocessor."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: add_documents after finalize/abort")
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if tokens.dtype != self.dtype:
            raise ValueError(f"add_documents: tokens are {tokens.dtype}, this writer writes {self.dtype.name}")
        if int(lengths.sum()) != tokens.size or (lengths.size and int(lengths.min()) < 0):
            raise ValueError(f"add_documents: lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("add_documents: a document does not fit the format's int32 length")
        self._bin.write(np.ascontiguousarray(tokens).tobytes())
        self._lengths.frombytes(lengths.astype(np.int64).tobytes())

    def _index_bytes(self) -> bytes:
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if len(self._lengths) else np.zeros(0, np.int64)
        n = lengths.size
        pointers = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(n + 1, dtype=np.int64)
        head = INDEX_HEADER + struct.pack("<Q", _VERSION) + struct.pack("<B", self._code)
        head += struct.pack("<Q", n) + struct.pack("<Q", n + 1)
        return head + lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes() + doc_index.tobytes()

    def finalize(self) -> None:
        """:meth:`prepare` then :meth:`commit`."""
        if self._done:
            return
        self.prepare()
        self.commit()

    def prepare(self) -> None:
        """Make the dataset durable under its temporary names (``.bin`` fsynced, ``.idx`` written and fsynced),
        nothing renamed yet: writers of several outputs prepare them all before committing any, so a full disk
        leaves none of them replaced."""
        if self._done or self._prepared:
            return
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            with open(self._idx_tmp, "wb") as f:
                f.write(self._index_bytes())
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.abort()
            raise
        self._prepared = True

    def commit(self) -> None:
        """Rename the prepared ``.bin`` then ``.idx`` into place."""
        if self._done:
            return
        self.prepare()
        try:
            idx = index_file_path(self.prefix)
            # drop a previous .idx first: a crash between the two renames then leaves a .bin without .idx
            # (refused at open) rather than a new .bin under an old index
            if os.path.exists(idx):
                os.unlink(idx)
            os.replace(self._bin_tmp, data_file_path(self.prefix))
            os.replace(self._idx_tmp, idx)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporaries; the prefix's existing files (if any) stay untouched."""
        self._done = True
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.unlink(p)


class IndexedDataset:
    """Memory-mapped reader of a ``.bin``/``.idx`` pair (ours or Megatron-Core's).

    ``dataset[i]`` / ``dataset.get(i, offset, length)`` return read-only views into the ``.bin`` map, O(1).
    Pickles by prefix (re-opened in the receiving process), so it can go to DataLoader workers.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for p in (idx_path, bin_path):
            if os.path.isdir(p):  # FileNotFoundError still: the type every caller reports in one line
                raise FileNotFoundError(f"indexed dataset file {p} is a directory, not a file")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        name = os.path.basename(idx_path)

        def bad(msg: str) -> CorruptIndexError:
            return CorruptIndexError(f"{name}: {msg} ({idx_path})")

        n_seq, n_doc = self._read_header(idx_path, bad)
        itemsize = np.dtype(self.dtype).itemsize
        self._map_index(idx_path, n_seq, n_doc)
        total_tokens = self._validate_sequences(bad, itemsize)
        self._validate_documents(bad, n_seq, n_doc)
        self._map_bin(bin_path, total_tokens, itemsize)

    def _read_header(self, idx_path: str, bad) -> tuple[int, int]:
        """Check the ``.idx`` header and its size against the counts it declares; sets ``self.dtype`` and returns
        the sequence and document-index counts."""
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER_SIZE:
            raise bad(f"truncated: the header needs {_HEADER_SIZE} bytes but the file holds {idx_size}")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER_SIZE)
        magic = head[:9]
        if magic != INDEX_HEADER:
            raise bad(f"magic: expected {INDEX_HEADER!r}, found {magic!r}: not a Megatron indexed dataset")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != _VERSION:
            raise bad(f"version: {version} is not supported (expected {_VERSION})")
        (code,) = struct.unpack_from("<B", head, 17)
        if code not in DTYPE_CODES:
            raise bad(f"dtype code: {code} is not a known code (known: {sorted(DTYPE_CODES)})")
        self.dtype: type[np.number] = DTYPE_CODES[code]
        n_seq, n_doc = struct.unpack_from("<QQ", head, 18)
        need = _HEADER_SIZE + 12 * n_seq + 8 * n_doc
        # Megatron's multimodal datasets append one int8 mode per sequence; the modes are ignored here
        if idx_size < need:
            raise bad(
                f"truncated: header says {n_seq} sequences and {n_doc} document indices ({need} bytes) "
                f"but the file holds {idx_size} bytes"
            )
        if idx_size not in (need, need + n_seq):
            raise bad(
                f"size: header says {n_seq} sequences and {n_doc} document indices ({need} bytes, or {need + n_seq} "
                f"with sequence modes) but the file holds {idx_size} bytes"
            )
        if n_doc < 1:
            raise bad("document_indices: empty (it must start with 0)")
        return n_seq, n_doc

    def _map_index(self, idx_path: str, n_seq: int, n_doc: int) -> None:
        """Views of the three ``.idx`` arrays into one read-only map (no copy)."""
        idx_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.sequence_lengths: np.ndarray = np.frombuffer(idx_map, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers: np.ndarray = np.frombuffer(idx_map, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices: np.ndarray = np.frombuffer(idx_map, dtype="<i8", count=n_doc, offset=off)
        self._idx_map = idx_map

    def _validate_documents(self, bad, n_seq: int, n_doc: int) -> None:
        """``document_indices`` runs monotonically from 0 to the sequence count."""
        doc = self.document_indices
        if doc[0] != 0:
            raise bad(f"document_indices: first entry is {int(doc[0])}, expected 0")
        if doc[-1] != n_seq:
            raise bad(f"document_indices: last entry is {int(doc[-1])}, expected the sequence count {n_seq}")
        if n_doc > 1 and np.any(np.diff(doc) < 0):
            k = int(np.argmax(np.diff(doc) < 0)) + 1
            raise bad(f"document_indices: not monotonic at entry {k} ({int(doc[k - 1])} then {int(doc[k])})")

    def _map_bin(self, bin_path: str, total_tokens: int, itemsize: int) -> None:
        """Check the ``.bin`` holds exactly the indexed tokens, then map it; sets ``num_tokens``."""
        bin_size = os.path.getsize(bin_path)
        want = total_tokens * itemsize
        if bin_size != want:
            what = "truncated" if bin_size < want else "size"
            raise CorruptIndexError(
                f"{os.path.basename(bin_path)}: {what}: the index says {total_tokens} tokens of "
                f"{np.dtype(self.dtype).name} ({want} bytes) but the file holds {bin_size} bytes ({bin_path})"
            )
        self.num_tokens: int = total_tokens
        # np.memmap refuses empty files
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)

    def _validate_sequences(self, bad, itemsize: int) -> int:
        """Lengths non-negative, pointers contiguous from 0 (what every Megatron writer produces). Returns tokens."""
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        expected_ptr = 0
        total = 0
        for lo in range(0, lengths.size, _CHUNK):
            ln = lengths[lo : lo + _CHUNK].astype(np.int64)
            if ln.size and ln.min() < 0:
                k = lo + int(np.argmax(ln < 0))
                raise bad(f"sequence_lengths: sequence {k} has negative length {int(lengths[k])}")
            ptr = pointers[lo : lo + _CHUNK]
            want = np.empty_like(ln)
            want[0] = expected_ptr
            np.cumsum(ln[:-1] * itemsize, out=want[1:])
            want[1:] += expected_ptr
            wrong = ptr != want
            if wrong.any():
                k = int(np.argmax(wrong))
                i = lo + k
                prev = int(pointers[i - 1]) if i > 0 else None
                if prev is not None and int(ptr[k]) < prev:
                    raise bad(f"sequence_pointers: not monotonic at sequence {i} ({prev} then {int(ptr[k])})")
                raise bad(
                    f"sequence_pointers: sequence {i} starts at byte {int(ptr[k])} but the lengths put it at "
                    f"byte {int(want[k])}"
                )
            expected_ptr = int(want[-1]) + int(ln[-1]) * itemsize
            total += int(ln.sum())
        return total

    # pickling: re-open by prefix
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"sequence index must be an integer, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences in {self.prefix}")
        return i

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return np.frombuffer(
            self._bin, dtype=self.dtype, count=int(self.sequence_lengths[i]), offset=int(self.sequence_pointers[i])
        )

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (to its end when ``length`` is None)."""
        i = self._check_index(i)
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {n}")
        itemsize = np.dtype(self.dtype).itemsize
        return np.frombuffer(
            self._bin, dtype=self.dtype, count=length, offset=int(self.sequence_pointers[i]) + offset * itemsize
        )

    def read_stream(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens from token position ``start`` of the whole ``.bin`` (all sequences concatenated)."""
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + count}) out of range for {self.num_tokens} tokens")
        itemsize = np.dtype(self.dtype).itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=count, offset=start * itemsize)

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, "
            f"dtype={np.dtype(self.dtype).name})"
        )


def _check_same_dtype(dss: Sequence[IndexedDataset]) -> np.dtype:
    """The shared dtype of ``dss``; ValueError naming the first dataset that differs from the first one."""
    dtype = np.dtype(dss[0].dtype)
    for ds in dss[1:]:
        if np.dtype(ds.dtype) != dtype:
            raise ValueError(
                f"{ds.prefix}: dtype {np.dtype(ds.dtype).name} differs from {dss[0].prefix}'s "
                f"{dtype.name}; re-tokenize with the same tokenizer"
            )
    return dtype


def _write_merged_bin(path: str, dss: Sequence[IndexedDataset]) -> None:
    """Concatenate the ``.bin`` files of ``dss`` into ``path`` in 16 MiB blocks, then fsync."""
    with open(path, "wb") as out:
        for ds in dss:
            with open(data_file_path(ds.prefix), "rb") as f:
                while block := f.read(1 << 24):
                    out.write(block)
        out.flush()
        os.fsync(out.fileno())


def _write_merged_index(
    path: str, dss: Sequence[IndexedDataset], dtype: np.dtype, n_seq: int, n_doc: int, chunk_sequences: int
) -> None:
    """The ``.idx`` of the concatenation: lengths as they are, pointers shifted by the bytes before each input,
    document indices shifted by the sequences before it (one leading 0); written in chunks, then fsynced."""
    with open(path, "wb") as out:
        out.write(INDEX_HEADER + struct.pack("<Q", _VERSION) + struct.pack("<B", _dtype_code(dtype)))
        out.write(struct.pack("<QQ", n_seq, n_doc))
        for ds in dss:
            for lo in range(0, len(ds), chunk_sequences):
                out.write(np.ascontiguousarray(ds.sequence_lengths[lo : lo + chunk_sequences], "<i4").tobytes())
        base = 0
        for ds in dss:
            for lo in range(0, len(ds), chunk_sequences):
                out.write((ds.sequence_pointers[lo : lo + chunk_sequences] + base).astype("<i8").tobytes())
            base += ds.num_tokens * dtype.itemsize
        out.write(struct.pack("<q", 0))
        seq_base = 0
        for ds in dss:
            doc = ds.document_indices
            for lo in range(1, len(doc), chunk_sequences):
                out.write((doc[lo : lo + chunk_sequences] + seq_base).astype("<i8").tobytes())
            seq_base += len(ds)
        out.flush()
        os.fsync(out.fileno())


def merge_datasets(prefixes: Sequence[str], output_prefix: str, chunk_sequences: int = 1 << 22) -> dict[str, int]:
    """Concatenate the datasets at ``prefixes`` into ``output_prefix`` (sequences and document boundaries kept, in
    order), streaming: ``.bin`` files are copied in blocks and the index written in chunks of ``chunk_sequences``,
    so memory does not grow with the corpus. All inputs must share a dtype (ValueError naming the first that does
    not). Written to temporary names and renamed at the end (``.idx`` last). Returns sequence/document/token counts.
    """
    if not prefixes:
        raise ValueError("merge_datasets: no input prefixes")
    if any(os.path.abspath(p) == os.path.abspath(output_prefix) for p in prefixes):
        raise ValueError(f"merge_datasets: output prefix {output_prefix} is also an input")
    dss = [IndexedDataset(p) for p in prefixes]
    dtype = _check_same_dtype(dss)
    n_seq = sum(len(ds) for ds in dss)
    n_doc = sum(len(ds.document_indices) - 1 for ds in dss) + 1
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)) or ".", exist_ok=True)
    remove_stale_temporaries(output_prefix)
    suffix = f".tmp-{os.getpid()}"
    bin_tmp, idx_tmp = data_file_path(output_prefix) + suffix, index_file_path(output_prefix) + suffix
    try:
        _write_merged_bin(bin_tmp, dss)
        _write_merged_index(idx_tmp, dss, dtype, n_seq, n_doc, chunk_sequences)
        idx = index_file_path(output_prefix)
        if os.path.exists(idx):
            os.unlink(idx)
        os.replace(bin_tmp, data_file_path(output_prefix))
        os.replace(idx_tmp, idx)
    except BaseException:
        for p in (bin_tmp, idx_tmp):
            if os.path.exists(p):
                os.unlink(p)
        raise
    return {"sequences": n_seq, "documents": n_doc - 1, "tokens": sum(ds.num_tokens for ds in dss)}
