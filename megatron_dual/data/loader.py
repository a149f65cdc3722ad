"""Training data at scale: exact repetition, blending by weights, memory-mapped sample indexes.

``data.path`` follows Megatron's ``--data-path`` habit: ``"prefix"``, ``"0.7 a 0.3 b"`` (weights, normalised), or
``"a b"`` (no weights: weighted by training tokens). A prefix may be a glob pattern (``data/web_text_document_*``,
the shards of ``--partitions``), which expands to every matching ``.idx``.

Per dataset, documents are first split into train / validation (``split_documents``). Then, with a token budget T
and a repetition factor R, the **unique subset** is the shortest prefix of a seeded permutation of the training
documents that holds at least T/R tokens, and the training stream is R **passes** over it, pass e visiting the
subset in its own seeded order. The stream is cut into samples of ``seq_len + 1`` tokens overlapping by one (sample
s covers stream tokens ``[s*L, s*L + L + 1)``); samples are shuffled within their pass (again seeded per pass). So
over the R passes every document of the subset is seen exactly R times and nothing else is seen, except that the
last ``R*U mod L`` tokens of the stream (fewer than one sample) are dropped. R = 0 means "all training documents,
as many passes as the budget needs". Everything is a pure function of (seed, pass, index). With ``layout =
"reference"`` (``data.packing``, megatron_dual.data.packing) a document occupies its tokens but the last as inputs,
each with its target; samples are ``seq_len`` input positions without overlap, and the subset and R count those.

Several datasets are blended by weight: dataset d gets a budget of about ``w_d * T`` and its own R passes, and the
global sample order interleaves them so that every prefix of the order holds each dataset's share to within one
sample (dataset d's k-th sample is placed at "time" ``(k + 0.5) / w_d``; the order sorts those times).

Indexes (per-pass document orders and offsets, per-pass sample permutations, the blend order) are numpy arrays
built lazily; above ``DISK_CACHE_MIN`` entries they are written once to ``cache_dir`` as ``.npy`` files (temporary
name, then rename) and memory-mapped, so a 10B-token corpus needs seconds and little resident memory.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from megatron_dual.data.indexed import IndexedDataset, index_file_path
from megatron_dual.data.packing import (
    PackedDataset,
    check_layout,
    read_plain,
    read_shifted,
    shifted_sample,
    stream_lengths,
)
from megatron_dual.data.sampler import dataset_fingerprint, split_documents

__all__ = [
    "parse_data_path",
    "parse_repetitions",
    "resolve_repetitions",
    "choose_subset",
    "RepeatedPackedDataset",
    "BlendedDataset",
    "DataPlan",
    "build_datasets",
    "DISK_CACHE_MIN",
]

DISK_CACHE_MIN = 1 << 20  # arrays with at least this many entries go to the disk cache (when one is configured)
_SUBSET_SALT = 0x5B5E7
_PASS_SALT = 0xE90C4
_SAMPLE_SALT = 0x5A3B1


class DataPathError(ValueError):
    """A ``data.path`` that cannot be parsed or resolved; the message names the value."""


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _weighted_pairs(spec: str, parts: list[str]) -> list[tuple[float | None, str]]:
    """``["0.7", "a", "0.3", "b"]`` -> ``[(0.7, "a"), (0.3, "b")]``, every weight a positive finite number."""
    if len(parts) % 2:
        raise DataPathError(f"data.path = {spec!r}: weighted form needs pairs 'weight prefix', got {len(parts)} items")
    pairs: list[tuple[float | None, str]] = []
    for w, p in zip(parts[::2], parts[1::2], strict=True):
        if not _is_number(w):
            raise DataPathError(f"data.path = {spec!r}: expected a weight before {p!r}, got {w!r}")
        weight = float(w)
        if not weight > 0 or not math.isfinite(weight):
            raise DataPathError(f"data.path = {spec!r}: weight {w} of {p!r} must be a positive number")
        pairs.append((weight, p))
    return pairs


def _unweighted_pairs(spec: str, parts: list[str]) -> list[tuple[float | None, str]]:
    bad = [p for p in parts if _is_number(p)]
    if bad:
        raise DataPathError(
            f"data.path = {spec!r}: mixes weights and prefixes ({bad[0]!r}); give a weight before "
            f"every prefix or none at all"
        )
    return [(None, p) for p in parts]


def _resolve_prefixes(spec: str, pairs: list[tuple[float | None, str]]) -> list[tuple[float | None, str]]:
    """Expand glob patterns (their weight negated: a group's share, resolved by tokens later) and check that every
    plain prefix has its ``.idx`` and that no ``.idx`` is a directory."""
    out: list[tuple[float | None, str]] = []
    for w, p in pairs:
        if glob.has_magic(p):
            found = sorted(f[: -len(".idx")] for f in glob.glob(p + ("" if p.endswith(".idx") else ".idx")))
            if not found:
                raise DataPathError(f"data.path = {spec!r}: pattern {p!r} matches no .idx file")
            out += [(None if w is None else -w, f) for f in found]  # negative: a share of a group, resolved later
        else:
            if not os.path.exists(index_file_path(p)):
                raise DataPathError(f"data.path = {spec!r}: {index_file_path(p)} does not exist")
            out.append((w, p))
    for _, p in out:
        if os.path.isdir(index_file_path(p)):
            raise DataPathError(f"data.path = {spec!r}: {index_file_path(p)} is a directory, not an index file")
    return out


def parse_data_path(spec: str) -> list[tuple[float | None, str]]:
    """``"0.7 a 0.3 b"`` -> ``[(0.7, "a"), (0.3, "b")]``; ``"a b"`` -> ``[(None, "a"), (None, "b")]``.

    Glob patterns expand to every matching prefix (``*.idx`` files), a weighted pattern sharing its weight among
    them in proportion to their tokens later. Raises DataPathError naming the value for a mix of weighted and
    unweighted entries, a non-positive weight, or a prefix without ``.idx`` (or whose ``.idx`` is a directory).
    """
    parts = str(spec).split()
    if not parts:
        raise DataPathError("data.path is empty: set it to a dataset prefix, e.g. data/corpus_text_document")
    pairs = _weighted_pairs(spec, parts) if _is_number(parts[0]) else _unweighted_pairs(spec, parts)
    return _resolve_prefixes(spec, pairs)


def parse_repetitions(spec: str, field_name: str = "data.repetitions") -> dict[str, int]:
    """``"web=4 books=16"`` (``*=R``: every dataset not named) -> {name: R}; each R a whole number >= 0."""
    out: dict[str, int] = {}
    for item in spec.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise DataPathError(
                f"{field_name} = {spec!r}: {item!r} is not name=R with a whole R >= 0 (e.g. "
                f'"web=4 books=16", or "*=8" for every dataset not named)'
            )
        if name in out:
            raise DataPathError(f"{field_name} = {spec!r}: {name} is given twice")
        out[name] = int(value)
    if not out:
        raise DataPathError(f"{field_name} = {spec!r}: empty; give an integer R or name=R pairs")
    return out


def _dataset_names(prefix: str) -> set[str]:
    base = os.path.basename(prefix)
    return {prefix, base, base.removesuffix("_text_document")}


def resolve_repetitions(spec: int | str, prefixes: list[str], field_name: str = "data.repetitions") -> list[int]:
    """R per dataset of a blend: an int for all, or a :func:`parse_repetitions` spec matched by name; a
    DataPathError naming the name that matches no dataset (or several), or the dataset that got none."""
    if not isinstance(spec, str):
        return [int(spec)] * len(prefixes)
    named = parse_repetitions(spec, field_name)
    out: list[int | None] = [named.get("*")] * len(prefixes)
    for name, r in named.items():
        if name == "*":
            continue
        hits = [i for i, p in enumerate(prefixes) if name in _dataset_names(p)]
        if len(hits) != 1:
            what = "matches no dataset" if not hits else f"matches {len(hits)} datasets"
            raise DataPathError(f"{field_name} = {spec!r}: {name!r} {what} of data.path ({', '.join(prefixes)})")
        out[hits[0]] = r
    missing = [p for p, r in zip(prefixes, out, strict=True) if r is None]
    if missing:
        raise DataPathError(f'{field_name} = {spec!r}: no R for {missing[0]}; name it or add "*=R"')
    return [int(r) for r in out]  # type: ignore[arg-type]


def choose_subset(train_docs: np.ndarray, lengths: np.ndarray, unique_tokens: int, seed: int) -> np.ndarray:
    """The shortest prefix of a seeded permutation of ``train_docs`` holding at least ``unique_tokens`` tokens
    (``lengths`` are the dataset's sequence lengths). Sorted int64. ValueError when all of them hold fewer."""
    perm = np.random.default_rng([int(seed), _SUBSET_SALT]).permutation(train_docs.size)
    cum = np.cumsum(lengths[train_docs[perm]], dtype=np.int64)
    total = int(cum[-1]) if cum.size else 0
    if total < unique_tokens:
        raise ValueError(
            f"the unique subset needs {unique_tokens:,} tokens but the training documents hold only {total:,}"
        )
    k = int(np.searchsorted(cum, unique_tokens, side="left")) + 1
    return np.sort(train_docs[perm[:k]]).astype(np.int64)


class _ArrayCache:
    """Lazily built arrays keyed by name: kept in memory (LRU of ``keep``) and, when large and a directory is
    given, saved once as ``<dir>/<name>.npy`` and memory-mapped thereafter."""

    def __init__(self, directory: str | None, keep: int = 4) -> None:
        self.directory = directory
        self.keep = keep
        self._mem: OrderedDict[str, tuple[np.ndarray, ...]] = OrderedDict()
        self.built = 0  # how many entries were computed (not loaded): lets tests see the disk cache work

    def get(self, name: str, build: Callable[[], tuple[np.ndarray, ...]], size_hint: int) -> tuple[np.ndarray, ...]:
        if name in self._mem:
            self._mem.move_to_end(name)
            return self._mem[name]
        arrays: tuple[np.ndarray, ...] | None = None
        use_disk = self.directory is not None and size_hint >= DISK_CACHE_MIN
        paths = [os.path.join(self.directory, f"{name}.{i}.npy") for i in range(8)] if use_disk else []
        if use_disk and os.path.exists(paths[0]):
            loaded = []
            for p in paths:
                if not os.path.exists(p):
                    break
                loaded.append(np.load(p, mmap_mode="r"))
            arrays = tuple(loaded)
        if arrays is None:
            arrays = build()
            self.built += 1
            if use_disk:
                assert self.directory is not None
                os.makedirs(self.directory, exist_ok=True)
                # later arrays first, the first one last: its presence means the entry is complete
                for i in reversed(range(len(arrays))):
                    tmp = f"{paths[i]}.tmp-{os.getpid()}.npy"
                    np.save(tmp, arrays[i])
                    os.replace(tmp, paths[i])
                arrays = tuple(np.load(p, mmap_mode="r") for p in paths[: len(arrays)])
        self._mem[name] = arrays
        while len(self._mem) > self.keep:
            self._mem.popitem(last=False)
        return arrays


class RepeatedPackedDataset:
    """R passes over ``documents`` of ``dataset`` (see the module docstring), cut into samples of ``seq_len + 1``
    tokens; ``ds[p]`` is the sample at position p of the (per-pass shuffled) order: ``{"tokens", "doc_ids"}``.

    ``layout = "reference"`` (megatron_dual.data.packing): each pass holds every document's tokens but its last as
    inputs, samples are ``seq_len`` input positions with their ``"targets"``, and ``unique_tokens`` counts those
    positions (tokens - documents), so every input and every target of the subset is seen exactly R times."""

    def __init__(
        self,
        dataset: IndexedDataset,
        documents: np.ndarray,
        seq_len: int,
        passes: int,
        seed: int,
        cache_dir: str | None = None,
        shuffle: bool = True,
        layout: str = "concat",
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len = {seq_len}: must be >= 1")
        if passes < 1:
            raise ValueError(f"passes = {passes}: must be >= 1")
        self.dataset = dataset
        self.documents = np.asarray(documents, dtype=np.int64)
        self.seq_len = int(seq_len)
        self.passes = int(passes)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.layout = check_layout(layout)
        self._lengths = stream_lengths(dataset.sequence_lengths[self.documents], layout)
        self.unique_tokens = int(self._lengths.sum())
        if self.unique_tokens < 1:
            raise ValueError(f"{dataset.prefix}: the chosen documents hold no tokens")
        # concat: the last sample may read one token of pass R (a label across a document boundary: never trained
        # on); reference: a sample's targets lie in its own documents
        self.num_samples = self.passes * self.unique_tokens // self.seq_len
        key = hashlib.sha256()
        key.update(dataset.prefix.encode())
        key.update(struct.pack("<qqqq", self.seq_len, self.seed, self.unique_tokens, int(self.shuffle)))
        key.update(self.documents.tobytes())
        if layout != "concat":  # (concat keeps the cache names it always had)
            key.update(layout.encode())
        self.key = key.hexdigest()[:16]
        self._cache = _ArrayCache(cache_dir)

    def __len__(self) -> int:
        return self.num_samples

    # --------------------------------------------------------------------------------------------- pass indexes
    def pass_index(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, offsets) of pass ``e``: the subset in pass e's order and the stream offset (within the
        pass) where each starts, plus the pass's total at the end."""

        def build() -> tuple[np.ndarray, np.ndarray]:
            n = self.documents.size
            order = np.random.default_rng([self.seed, _PASS_SALT, e]).permutation(n) if self.shuffle else np.arange(n)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(self._lengths[order], out=offsets[1:])
            idx_dtype = np.uint32 if len(self.dataset) < 2**32 else np.int64
            return self.documents[order].astype(idx_dtype), offsets

        return self._cache.get(f"{self.key}_pass{e}", build, self.documents.size)  # type: ignore[return-value]

    def pass_documents(self, e: int) -> np.ndarray:
        return np.asarray(self.pass_index(e)[0], dtype=np.int64)

    def _block_start(self, e: int) -> int:
        """First sample whose start token lies in pass e."""
        return min(self.num_samples, -(-e * self.unique_tokens // self.seq_len))

    def _sample_perm(self, e: int) -> np.ndarray:
        lo, hi = self._block_start(e), self._block_start(e + 1)

        def build() -> tuple[np.ndarray]:
            n = hi - lo
            if not self.shuffle:
                return (np.arange(n, dtype=np.int64),)
            return (np.random.default_rng([self.seed, _SAMPLE_SALT, e]).permutation(n).astype(np.int64),)

        return self._cache.get(f"{self.key}_samples{e}_{self.num_samples}", build, hi - lo)[0]

    def sample_at(self, position: int) -> int:
        """The stream sample index at ``position`` of the order."""
        U, L = self.unique_tokens, self.seq_len
        e = min(position * L // U, self.passes - 1)
        while e > 0 and self._block_start(e) > position:
            e -= 1
        while self._block_start(e + 1) <= position:
            e += 1
        lo = self._block_start(e)
        return lo + int(self._sample_perm(e)[position - lo])

    # ------------------------------------------------------------------------------------------------ samples
    def _pass_spans(self, start: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
        """Stream positions ``[start, start + count)`` cut at pass boundaries: ``(docs, offsets, local start,
        count)`` of each pass's index."""
        U = self.unique_tokens
        pos, end = start, start + count
        while pos < end:
            e, local = divmod(pos, U)
            take = min(end - pos, U - local)
            yield (*self.pass_index(e), local, take)
            pos += take

    def read(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens ``[start, start + count)`` and, per token, whether a document starts there."""
        parts = [read_plain(self.dataset, *span) for span in self._pass_spans(start, count)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def read_shifted(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reference layout: ``(inputs, targets, is_start)`` of input positions ``[start, start + count)``."""
        parts = [read_shifted(self.dataset, *span) for span in self._pass_spans(start, count)]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        n = self.num_samples
        if not isinstance(position, (int, np.integer)):
            raise TypeError(f"sample index must be an integer, got {type(position).__name__}")
        p = int(position)
        if p < 0:
            p += n
        if not 0 <= p < n:
            raise IndexError(f"sample index {p} out of range for {n} samples")
        s = self.sample_at(p)
        if self.layout == "reference":
            return shifted_sample(*self.read_shifted(s * self.seq_len, self.seq_len))
        tokens, is_start = self.read(s * self.seq_len, self.seq_len + 1)
        is_start[0] = False  # ids are local to the sample: the first (partial) document is 0
        return {"tokens": tokens.astype(np.int64), "doc_ids": np.cumsum(is_start, dtype=np.int64)}

    def __repr__(self) -> str:
        return (
            f"RepeatedPackedDataset({self.dataset.prefix!r}, documents={self.documents.size}, "
            f"unique_tokens={self.unique_tokens}, passes={self.passes}, samples={self.num_samples}"
            + (", layout='reference')" if self.layout == "reference" else ")")
        )


class BlendedDataset:
    """Interleaves ``datasets`` by ``weights`` into ``size`` samples; ``ds[p]`` is sample ``p`` of the blend.

    Dataset d's k-th sample sits at time ``(k + 0.5) / w_d``; the order sorts the times (ties by dataset), so every
    prefix of n samples holds ``w_d * n`` of dataset d to within one. ``source(p)`` -> (dataset, its index)."""

    def __init__(
        self, datasets: list, weights: list[float], size: int, cache_dir: str | None = None, name: str = "blend"
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w <= 0):
            raise ValueError(f"weights {weights}: must be positive")
        self.datasets = datasets
        self.layout = getattr(datasets[0], "layout", "concat")  # the sample layout (all datasets share it)
        self.weights = w / w.sum()
        self.size = int(size)
        key = hashlib.sha256(repr((name, self.weights.tolist(), self.size)).encode()).hexdigest()[:16]
        self._key = f"blend_{key}"
        self._cache = _ArrayCache(cache_dir, keep=1)
        counts = self.counts()
        for d, (ds, c) in enumerate(zip(datasets, counts, strict=True)):
            if c > len(ds):
                raise ValueError(
                    f"dataset {d} ({getattr(ds, 'dataset', ds)!r}) has {len(ds)} samples but the blend needs {c}"
                )

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        def build() -> tuple[np.ndarray, np.ndarray]:
            times, which, local = [], [], []
            for d, wd in enumerate(self.weights):
                n = int(math.ceil(wd * self.size)) + 1
                k = np.arange(n, dtype=np.int64)
                times.append((k + 0.5) / wd)
                which.append(np.full(n, d, dtype=np.int16))
                local.append(k)
            t = np.concatenate(times)
            order = np.lexsort((np.concatenate(which), t))[: self.size]
            return np.concatenate(which)[order], np.concatenate(local)[order]

        return self._cache.get(self._key, build, self.size)  # type: ignore[return-value]

    def counts(self) -> list[int]:
        which, _ = self._index()
        return np.bincount(np.asarray(which), minlength=len(self.datasets)).tolist()

    def source(self, p: int) -> tuple[int, int]:
        which, local = self._index()
        return int(which[p]), int(local[p])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, p: int) -> dict[str, np.ndarray]:
        if not isinstance(p, (int, np.integer)):
            raise TypeError(f"sample index must be an integer, got {type(p).__name__}")
        p = int(p)
        if p < 0:
            p += self.size
        if not 0 <= p < self.size:
            raise IndexError(f"sample index {p} out of range for {self.size} samples")
        d, k = self.source(p)
        return self.datasets[d][k]


@dataclass
class DataPlan:
    """What ``build_datasets`` decided, for logs and checks."""

    prefixes: list[str]
    weights: list[float]
    budget_tokens: int
    repetitions: int | str  # 0: as many passes as needed over all training documents; str: per dataset
    unique_tokens: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)
    train_documents: list[int] = field(default_factory=list)
    subset_documents: list[int] = field(default_factory=list)
    per_dataset: list[int] = field(default_factory=list)  # R of each dataset
    packing: str = "concat"  # the sample layout (megatron_dual.data.packing.LAYOUTS)
    valid_documents: list[int] = field(default_factory=list)  # held-out documents of each dataset
    valid_tokens: list[int] = field(default_factory=list)  # what they pack into (input positions under reference)

    def describe(self) -> str:
        rows = []
        for p, w, u, r, n in zip(
            self.prefixes, self.weights, self.unique_tokens, self.passes, self.subset_documents, strict=True
        ):
            rows.append(f"{p} (weight {w:.3f}): {n:,} documents, {u:,} unique tokens x {r} passes")
        packing = "" if self.packing == "concat" else f", packing {self.packing} (unique tokens: input positions)"
        return f"budget {self.budget_tokens:,} tokens, R = {self.repetitions or 'auto'}{packing}; " + "; ".join(rows)


def _fingerprint(parts: list[str], plan: DataPlan, seq_len: int, seed: int) -> str:
    h = hashlib.sha256(b"megatron-dual/blend/v1")
    reps = plan.per_dataset if isinstance(plan.repetitions, str) else plan.repetitions  # int: as before
    h.update(repr((plan.weights, plan.budget_tokens, reps, plan.passes, seq_len, seed)).encode())
    if plan.packing != "concat":  # concat: the fingerprint it always had, so those checkpoints still resume
        h.update(f"packing={plan.packing}".encode())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()


def _blend_weights(path: str, raw: list[float | None], train_tokens: list[int]) -> list[float]:
    """Normalised weights: explicit, a group's weight shared by tokens (negative marks), or all by tokens when none
    given."""
    weights = [0.0] * len(raw)
    group_total: dict[float, int] = {}
    for w, t in zip(raw, train_tokens, strict=True):
        if w is not None and w < 0:
            group_total[w] = group_total.get(w, 0) + t
    for i, (w, t) in enumerate(zip(raw, train_tokens, strict=True)):
        if w is None:
            weights[i] = float(t)
        elif w < 0:
            weights[i] = -w * t / max(group_total[w], 1)
        else:
            weights[i] = w
    if all(w is None for w in raw) and sum(weights) == 0:
        raise ValueError(f"data.path = {path!r}: the datasets hold no training tokens")
    total_w = sum(weights)
    return [w / total_w for w in weights]


def _subset_and_passes(
    prefix: str,
    ds: IndexedDataset,
    tr: np.ndarray,
    w: float,
    need_tokens: int,
    seq_len: int,
    seed: int,
    budget_tokens: int,
    repetitions: int,
    layout: str = "concat",
) -> tuple[np.ndarray, int]:
    """The documents this dataset trains on and how many passes over them cover its ``need_tokens``: a unique
    subset of need/R tokens for R passes, or (R = 0) every training document, as many passes as needed. Tokens
    are stream positions of ``layout`` (reference: a document's tokens but its last)."""
    lengths = stream_lengths(ds.sequence_lengths, layout)
    if repetitions > 0:
        unique = -(-need_tokens // repetitions)
        try:
            subset = choose_subset(tr, lengths, unique, seed)
        except ValueError as e:
            raise ValueError(
                f"{prefix}: data.repetitions = {repetitions} with a budget of {budget_tokens:,} tokens gives this "
                f"dataset (weight {w:.3f}) {need_tokens:,} tokens, so {unique:,} unique ones, but {e.args[0]}: "
                f"lower data.repetitions, the budget or the weight, or add data"
            ) from e
        return subset, repetitions
    total = int(lengths[tr].sum(dtype=np.int64))
    if total < 1:
        raise ValueError(f"{prefix}: the training documents hold no tokens")
    return tr, max(1, -(-(need_tokens + seq_len) // total))


def _blend_valid(valids: list[tuple[PackedDataset, float]]) -> BlendedDataset | PackedDataset | None:
    """One validation set from the per-dataset ones, blended by their weights (the first alone if no blend fits)."""
    valid: BlendedDataset | PackedDataset | None = None
    if len(valids) == 1:
        valid = valids[0][0]
    elif valids:
        vw = [w for _, w in valids]
        size = min(int(len(v) * sum(vw) / w) for v, w in valids)
        for _ in range(3):  # the interleave may ask one sample more of a dataset than the ratio: shrink until it fits
            try:
                valid = BlendedDataset([v for v, _ in valids], vw, size, name="valid")
                break
            except ValueError:
                size -= len(valids)
        if valid is None:
            valid = valids[0][0]
    return valid


def _open_and_split(
    path: str, entries: list[tuple[float | None, str]], valid_fraction: float, seed: int
) -> tuple[list[IndexedDataset], list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """The datasets of ``data.path``, their (train, validation) document splits and their blend weights."""
    datasets = [IndexedDataset(p) for _, p in entries]
    splits = [split_documents(len(ds), valid_fraction, seed) for ds in datasets]
    train_tokens = [
        int(ds.sequence_lengths[tr].sum(dtype=np.int64)) for ds, (tr, _) in zip(datasets, splits, strict=True)
    ]
    return datasets, splits, _blend_weights(path, [w for w, _ in entries], train_tokens)


def build_datasets(
    path: str,
    seq_len: int,
    seed: int,
    valid_fraction: float,
    budget_tokens: int,
    repetitions: int | str,
    cache_dir: str | None = None,
    layout: str = "concat",
) -> tuple[BlendedDataset | RepeatedPackedDataset, BlendedDataset | PackedDataset | None, str, DataPlan]:
    """Train dataset, validation dataset (or None), fingerprint and plan for ``data.path`` (see module docstring).

    ``budget_tokens`` (> 0): the tokens training will consume; ``repetitions`` R >= 1 picks a unique subset of
    budget/R tokens per dataset (its share of the budget), R = 0 uses every training document; a
    ``"web=4 books=16"`` spec gives each dataset its own R (:func:`resolve_repetitions`). ``cache_dir``: where
    large indexes go (``None``: memory only). ``layout``: how samples are packed (megatron_dual.data.packing;
    training and validation alike). Raises ValueError naming the dataset when it cannot hold its share.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens = {budget_tokens}: must be >= 1")
    entries = parse_data_path(path)
    per_dataset = resolve_repetitions(repetitions, [p for _, p in entries])
    if min(per_dataset) < 0:
        raise ValueError(f"repetitions = {repetitions}: must be >= 0")
    datasets, splits, weights = _open_and_split(path, entries, valid_fraction, seed)
    L = seq_len
    n_total = max(1, budget_tokens // L)
    plan = DataPlan([p for _, p in entries], weights, budget_tokens, repetitions)
    plan.per_dataset = per_dataset
    plan.packing = check_layout(layout)
    trains: list[RepeatedPackedDataset] = []
    valids: list[tuple[PackedDataset, float]] = []
    parts: list[str] = []
    for (_, prefix), ds, (tr, va), w, reps in zip(entries, datasets, splits, weights, per_dataset, strict=True):
        if w == 0:
            raise ValueError(f"{prefix}: holds no training tokens (data.path = {path!r})")
        # this dataset's share: enough samples for any blend prefix (+2 for rounding), in tokens
        need_tokens = (int(math.ceil(w * n_total)) + 2) * L
        subset, passes = _subset_and_passes(prefix, ds, tr, w, need_tokens, L, seed, budget_tokens, reps, layout)
        rp = RepeatedPackedDataset(ds, subset, L, passes, seed, cache_dir=cache_dir, layout=layout)
        trains.append(rp)
        plan.unique_tokens.append(rp.unique_tokens)
        plan.passes.append(passes)
        plan.train_documents.append(int(tr.size))
        plan.subset_documents.append(int(subset.size))
        parts.append(dataset_fingerprint(ds, L, subset))
        v = PackedDataset(ds, L, va, layout=layout) if va.size else None
        plan.valid_documents.append(int(va.size))
        plan.valid_tokens.append(v.num_tokens if v is not None else 0)
        if v is not None and len(v):
            valids.append((v, w))
    fingerprint = _fingerprint(parts, plan, L, seed)
    if len(trains) == 1:
        train: BlendedDataset | RepeatedPackedDataset = trains[0]
    else:
        size = min(n_total, min(int(len(t) / w) for t, w in zip(trains, weights, strict=True)))
        train = BlendedDataset(trains, weights, size, cache_dir=cache_dir, name=fingerprint)
    return train, _blend_valid(valids), fingerprint, plan
