"""Packing documents into fixed-length training samples with per-token document ids, in one of two layouts.

* ``concat`` (:data:`LAYOUTS` [0], the ``paper`` recipe): documents concatenated; a sample is ``seq_len + 1``
  stream tokens (inputs ``tokens[:-1]``, targets ``tokens[1:]``), so a document's final token is an input whose
  target (the next document's first token) is not trained on.
* ``reference`` (the paper's training code, ``pretraining/dataset.py`` ``Datasetv2.chunk``): each document ``d``
  contributes inputs ``d[:-1]`` and targets ``d[1:]``; the input stream is cut into samples of ``seq_len`` positions
  with no overlap. Every position has a target, the next token of its own document (a document's final token is a
  target, never an input), and a document of one token contributes nothing. Samples are ``{"tokens": inputs,
  "targets", "doc_ids"}`` of ``seq_len`` each.

In both layouts ``doc_ids`` is local to the sample: 0 for the first (possibly partial) document, +1 where a new
document starts. The reference numbers a chunk that starts at a document start from 1; only equality matters
(attention within a document), so the partitions are the same.
"""

from __future__ import annotations

import numpy as np

from megatron_dual.data.indexed import IndexedDataset

__all__ = [
    "LAYOUTS",
    "PackedDataset",
    "check_layout",
    "stream_lengths",
    "read_spans",
    "read_plain",
    "read_shifted",
    "shifted_sample",
]

LAYOUTS = ("concat", "reference")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"packing layout {layout!r}: one of {', '.join(LAYOUTS)}")
    return layout


def stream_lengths(lengths: np.ndarray, layout: str) -> np.ndarray:
    """Positions each document occupies in the stream: its length (concat), or its length - 1 (reference: the final
    token is only a target), int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return lengths if check_layout(layout) == "concat" else np.maximum(lengths - 1, 0)


def read_spans(
    dataset: IndexedDataset, docs: np.ndarray, offsets: np.ndarray, start: int, count: int, extra: int = 0
) -> list[tuple[np.ndarray, bool]]:
    """Per document overlapping stream positions ``[start, start + count)`` of a stream where document ``docs[k]``
    holds positions ``[offsets[k], offsets[k + 1])``: its tokens at those positions (and ``extra`` more of the same
    document after them) and whether the document starts inside the span."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, start + count - 1, side="right")) - 1
    out = []
    for k in range(first, last + 1):
        lo = max(start, int(offsets[k]))
        hi = min(start + count, int(offsets[k + 1]))
        if hi > lo:
            out.append((dataset.get(int(docs[k]), lo - int(offsets[k]), hi - lo + extra), lo == int(offsets[k])))
    return out


def _start_marks(length: int, starts: bool) -> np.ndarray:
    mark = np.zeros(length, dtype=bool)
    mark[0] = starts
    return mark


def read_shifted(
    dataset: IndexedDataset, docs: np.ndarray, offsets: np.ndarray, start: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference layout: ``(inputs, targets, is_start)`` of input positions ``[start, start + count)`` of a stream
    where document ``docs[k]`` holds positions ``[offsets[k], offsets[k + 1])`` (its tokens but the last); the
    target of each input is the token after it in its document. ``is_start``: a document starts at that position."""
    spans = read_spans(dataset, docs, offsets, start, count, extra=1)  # one more: the last input's target
    inputs = np.concatenate([piece[:-1] for piece, _ in spans])
    targets = np.concatenate([piece[1:] for piece, _ in spans])
    return inputs, targets, np.concatenate([_start_marks(piece.size - 1, st) for piece, st in spans])


def read_plain(
    dataset: IndexedDataset, docs: np.ndarray, offsets: np.ndarray, start: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated layout: ``(tokens, is_start)`` of stream positions ``[start, start + count)``."""
    spans = read_spans(dataset, docs, offsets, start, count)
    return np.concatenate([p for p, _ in spans]), np.concatenate([_start_marks(p.size, st) for p, st in spans])


def shifted_sample(inputs: np.ndarray, targets: np.ndarray, is_start: np.ndarray) -> dict[str, np.ndarray]:
    """The sample dict of the reference layout (doc ids local to the sample, see the module docstring)."""
    is_start = is_start.copy()
    is_start[0] = False
    return {
        "tokens": inputs.astype(np.int64),
        "targets": targets.astype(np.int64),
        "doc_ids": np.cumsum(is_start, dtype=np.int64),
    }


class PackedDataset:
    """Concatenates the given documents (in the given order) into one token stream and cuts samples of seq_len+1
    tokens overlapping by one token (Megatron GPTDataset habit: sample i covers
    ``stream[i*seq_len : (i+1)*seq_len + 1]``), so inputs ``tokens[:-1]`` and targets ``tokens[1:]`` of consecutive
    samples tile the stream. The tail that does not fill a sample is dropped.

    ``doc_ids`` is a segment index local to the sample: 0 for the first (possibly partial) document, +1 at every
    position where a new document starts. Documents are sequence indices of ``dataset``; ``None`` means all, in
    order (then samples are single contiguous reads of the ``.bin``).

    ``layout = "reference"``: samples of ``seq_len`` input positions with their targets instead (module docstring).
    """

    def __init__(
        self, dataset: IndexedDataset, seq_len: int, documents: np.ndarray | None = None, layout: str = "concat"
    ) -> None:
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
        self.layout = check_layout(layout)
        lengths = stream_lengths(dataset.sequence_lengths[docs], layout)
        # doc_offsets[k] = stream position where document k starts; doc_offsets[-1] = total tokens (positions)
        self.doc_offsets = np.zeros(docs.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.doc_offsets[1:])
        self.num_tokens: int = int(self.doc_offsets[-1])
        self._contiguous = docs.size == n and bool(np.array_equal(docs, np.arange(n))) and layout == "concat"

    def __len__(self) -> int:
        if self.layout == "reference":
            return self.num_tokens // self.seq_len
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
        if self.layout == "reference":
            return shifted_sample(
                *read_shifted(self.dataset, self.documents, self.doc_offsets, i * self.seq_len, self.seq_len)
            )
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
            f"tokens={self.num_tokens}, samples={len(self)}"
            + (", layout='reference')" if self.layout == "reference" else ")")
        )
