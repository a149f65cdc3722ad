"""Deterministic, resumable data order.

The order is a pure function of ``(seed, epoch, index)``: epoch ``e`` visits ``epoch_permutation(N, seed, e)``. A
sampler's whole state is ``(seed, consumed_samples)`` plus a fingerprint of the dataset it indexes and the packing
layout of its samples, checked on resume so a checkpoint is never silently continued on different data.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import numpy as np

from megatron_dual.data.indexed import IndexedDataset

__all__ = ["split_documents", "epoch_permutation", "dataset_fingerprint", "ResumableSampler"]

# Salt so the document split and the epoch permutations never draw from the same stream for the same seed.
_SPLIT_SALT = 0x5E11D0C


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed = {seed}: must be >= 0")
    return seed


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split document indices into ``(train, valid)``, both sorted int64, disjoint, deterministic in ``seed``.

    ``round(num_documents * valid_fraction)`` documents go to valid, at least one when ``valid_fraction > 0``;
    ValueError when that would leave no training document.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction = {valid_fraction}: must be in [0, 1)")
    if num_documents < 1:
        raise ValueError(f"num_documents = {num_documents}: there are no documents to split")
    n_valid = 0 if valid_fraction == 0 else max(1, round(num_documents * valid_fraction))
    if n_valid >= num_documents:
        raise ValueError(
            f"valid_fraction = {valid_fraction} of {num_documents} documents puts {n_valid} in validation and leaves "
            f"no training documents: lower valid_fraction or add data"
        )
    perm = np.random.default_rng([_check_seed(seed), _SPLIT_SALT]).permutation(num_documents)
    return np.sort(perm[n_valid:]).astype(np.int64), np.sort(perm[:n_valid]).astype(np.int64)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of samples in ``epoch``: a pure function of its arguments."""
    if epoch < 0:
        raise ValueError(f"epoch = {epoch}: must be >= 0")
    return np.random.default_rng([_check_seed(seed), int(epoch)]).permutation(num_samples).astype(np.int64)


def dataset_fingerprint(dataset: IndexedDataset, seq_len: int, documents: np.ndarray) -> str:
    """sha256 hex over what determines the samples: dtype, counts, every sequence length, seq_len, the document
    list, and the first tokens of up to 64 evenly spaced documents (cheap: no full pass over the tokens)."""
    docs = np.ascontiguousarray(np.asarray(documents, dtype="<i8"))
    h = hashlib.sha256()
    h.update(b"megatron-dual/packed/v1")
    h.update(np.dtype(dataset.dtype).name.encode())
    h.update(struct.pack("<QQQ", len(dataset), len(dataset.document_indices), int(seq_len)))
    h.update(np.ascontiguousarray(dataset.sequence_lengths, dtype="<i4").tobytes())
    h.update(struct.pack("<Q", docs.size))
    h.update(docs.tobytes())
    if docs.size:
        for k in np.unique(np.linspace(0, docs.size - 1, num=min(64, docs.size)).astype(np.int64)):
            seq = int(docs[k])
            n = min(32, int(dataset.sequence_lengths[seq]))
            h.update(np.ascontiguousarray(dataset.get(seq, 0, n), dtype="<i8").tobytes())
    return h.hexdigest()


class ResumableSampler:
    """Yields sample indices epoch after epoch, a fresh permutation each epoch (or in order when not ``shuffle``).

    ``next_indices(n)`` crosses epoch boundaries seamlessly. ``state_dict()`` / ``load_state_dict()`` capture and
    restore the position; the continuation after a restore is identical to an uninterrupted run.
    """

    def __init__(
        self, num_samples: int, seed: int, fingerprint: str, shuffle: bool = True, packing: str = "concat"
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples = {num_samples}: the sampler needs at least one sample")
        self.num_samples = int(num_samples)
        self.seed = _check_seed(seed)
        self.fingerprint = str(fingerprint)
        self.shuffle = bool(shuffle)
        self.packing = str(packing)  # the sample layout (data.packing), named when a resume finds another
        self.consumed_samples = 0
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = (
                epoch_permutation(self.num_samples, self.seed, epoch)
                if self.shuffle
                else np.arange(self.num_samples, dtype=np.int64)
            )
            self._cached = (epoch, order)
        return self._cached[1]

    def index_at(self, position: int) -> int:
        """The sample at global position ``position`` (0 = first sample ever drawn)."""
        epoch, pos = divmod(int(position), self.num_samples)
        return int(self._order(epoch)[pos])

    def indices(self, start: int, n: int) -> list[int]:
        """The ``n`` samples at global positions ``start, start + 1, ...`` (pure: the position is not moved)."""
        if n < 0 or start < 0:
            raise ValueError(f"start = {start}, n = {n}: both must be >= 0")
        out: list[int] = []
        position = int(start)
        while len(out) < n:
            epoch, pos = divmod(position, self.num_samples)
            take = min(n - len(out), self.num_samples - pos)
            out.extend(self._order(epoch)[pos : pos + take].tolist())
            position += take
        return out

    def next_indices(self, n: int) -> list[int]:
        out = self.indices(self.consumed_samples, n)
        self.consumed_samples += n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "consumed_samples": self.consumed_samples,
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "packing": self.packing,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("seed", "consumed_samples", "fingerprint", "num_samples") if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)} (has {sorted(state)})")
        diffs = []
        packing = state.get("packing", "concat")  # states older than the field were all packed by concatenation
        if packing != self.packing:
            diffs.append(f"data.packing (the sample layout) {packing!r} in the checkpoint vs {self.packing!r} now")
        for key, now in (("seed", self.seed), ("num_samples", self.num_samples), ("shuffle", self.shuffle)):
            if key in state and state[key] != now:
                diffs.append(f"{key} {state[key]!r} in the checkpoint vs {now!r} now")
        if state["fingerprint"] != self.fingerprint or diffs:
            raise ValueError(
                "the checkpoint's data state was made on a different dataset or data order"
                + (f" ({'; '.join(diffs)})" if diffs else "")
                + f": checkpoint fingerprint {state['fingerprint']}, current dataset fingerprint {self.fingerprint}"
            )
        consumed = int(state["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"sampler state: consumed_samples = {consumed} is negative")
        self.consumed_samples = consumed
