"""Packing documents into fixed-length training samples with per-token document ids."""

from __future__ import annotations

import numpy as np

from megatron_dual.data.indexed import IndexedDataset

__all__ = ["PackedDataset"]


class PackedDataset:
    """Concatenates the given documents (in the given order) into one token stream and cuts samples of seq_len+1
    tokens overlapping by one token (Megatron GPTDataset habit: sample i covers
    ``stream[i*seq_len : (i+1)*seq_len + 1]``), so inputs ``tokens[:-1]`` and targets ``tokens[1:]`` of consecutive
    samples tile the stream. The tail that does not fill a sample is dropped.

    ``doc_ids`` is a segment index local to the sample: 0 for the first (possibly partial) document, +1 at every
    position where a new document starts. Documents are sequence indices of ``dataset``; ``None`` means all, in
    order (then samples are single contiguous reads of the ``.bin``).
    """

    def __init__(self, dataset: IndexedDataset, seq_len: int, documents: np.ndarray | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len}: must be >= 1")
        self.dataset = dataset
        self.seq_len = int(seq_len)
        n = len(dataset)
        if documents is None:
            docs = np.arange(n, dtype=np.int64)
        else:
            docs = np.asarray(documents, dtype=np.int64).reshape(-1)
            if docs.size and (docs.min() < 0 or docs.max() >= n):
                bad = int(docs[(docs < 0) | (docs >= n)][0])
                raise IndexError(f"document {bad} out of range for {n} sequences in {dataset.prefix}")
        self.documents = docs
        lengths = dataset.sequence_lengths[docs].astype(np.int64)
        # doc_offsets[k] = stream position where document k starts; doc_offsets[-1] = total tokens
        self.doc_offsets = np.zeros(docs.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.doc_offsets[1:])
        self.num_tokens: int = int(self.doc_offsets[-1])
        self._contiguous = docs.size == n and bool(np.array_equal(docs, np.arange(n)))

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"sample index must be an integer, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        span = self.seq_len + 1
        start, end = i * self.seq_len, i * self.seq_len + span
        offsets = self.doc_offsets
        # documents overlapping [start, end): first is the one containing start, last the one containing end-1
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, end - 1, side="right")) - 1
        if self._contiguous:
            tokens = self.dataset.read_stream(start, span).astype(np.int64)
        else:
            pieces = []
            for k in range(first, last + 1):
                lo = max(start, int(offsets[k]))
                hi = min(end, int(offsets[k + 1]))
                if hi > lo:
                    pieces.append(self.dataset.get(int(self.documents[k]), lo - int(offsets[k]), hi - lo))
            tokens = np.concatenate(pieces).astype(np.int64)
        # document starts strictly inside the sample; assignment (not +=) so empty documents count once
        starts = offsets[first + 1 : last + 1] - start
        marks = np.zeros(span, dtype=np.int64)
        marks[starts] = 1
        doc_ids = np.cumsum(marks)
        return {"tokens": tokens, "doc_ids": doc_ids}

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.dataset.prefix!r}, seq_len={self.seq_len}, documents={self.documents.size}, "
            f"tokens={self.num_tokens}, samples={len(self)})"
        )
