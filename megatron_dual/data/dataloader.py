"""The training data loader: what the loop asks for at each step, ready on the device.

:func:`build_data` turns ``cfg.data`` into datasets (``megatron_dual.data.loader``: blending, exact repetition,
train/valid split). :class:`TrainDataLoader` owns the resumable sampler (its state is the loader's state: seed,
consumed samples and the dataset fingerprint, checked on resume), the global-to-data-parallel slicing, collation and
the objective batches of this rank's micro-batch slots. On CUDA it prepares the next step's slots in a background
thread into pinned memory while the current step computes, and copies them with ``non_blocking``.

Every rank draws the same global sample positions; global slot ``g = dp_rank * slots + slot`` reads
``indices[g * mbs : (g + 1) * mbs]`` and seeds its MD masks by ``(seed, step, g)``, so a step is the same computation
whatever the number of data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from megatron_dual.config import Config, ConfigError, DataConfig
from megatron_dual.data.indexed import IndexedDataset, data_file_path, index_file_path
from megatron_dual.data.loader import DataPathError, DataPlan, build_datasets, parse_data_path
from megatron_dual.data.sampler import ResumableSampler
from megatron_dual.data.tokenizer import load_tokenizer
from megatron_dual.objectives import OBJECTIVES, TWO_OBJECTIVES, ObjectiveBatch, ObjectiveBatcher, ObjectiveSchedule

__all__ = [
    "SampleSource",
    "DataBundle",
    "build_data",
    "collate",
    "collate_samples",
    "StepBatches",
    "TrainDataLoader",
    "validation_batches",
    "validation_off_note",
    "token_id_range",
]


class SampleSource(Protocol):
    """What the loader reads: ``len(ds)`` samples, ``ds[i] -> {"tokens", "doc_ids"}`` of ``seq_len + 1`` each
    (``PackedDataset``, ``RepeatedPackedDataset``, ``BlendedDataset``), or, packed by the reference layout,
    ``{"tokens", "targets", "doc_ids"}`` of ``seq_len`` each (megatron_dual.data.packing)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclass
class DataBundle:
    train: SampleSource  # order already shuffled by the datasets (per pass): the sampler walks it in order
    valid: SampleSource | None
    fingerprint: str
    plan: DataPlan | None = None
    packing: str = "concat"  # the sample layout (data.packing resolved by the recipe)


def _run_tokens(cfg: Config, dp_size: int, extending: bool = False) -> int:
    """The token budget the datasets are built for. ``extending`` (a resumed run whose train.steps was raised past a
    pinned budget): the budget may be less than the run consumes, the steps past it repeat the same data."""
    step_tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * dp_size * cfg.data.seq_len
    run_tokens = cfg.train.steps * step_tokens
    if cfg.data.budget_tokens and cfg.data.budget_tokens < run_tokens and not extending:
        raise ConfigError(
            f"data.budget_tokens = {cfg.data.budget_tokens} is less than the {run_tokens:,} tokens "
            f"training consumes (train.steps {cfg.train.steps} x {step_tokens:,} tokens per step): "
            f"raise it or set it to 0"
        )
    return cfg.data.budget_tokens or run_tokens


MAX_ID_CHUNK = 1 << 24  # tokens per chunk of the vectorised max over a .bin


def _file_key(prefix: str) -> str:
    """What identifies a .bin/.idx pair's contents cheaply: real paths, sizes and modification times."""
    parts = []
    for path in (index_file_path(prefix), data_file_path(prefix)):
        st = os.stat(path)
        parts.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def token_id_range(prefix: str, cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in the whole ``.bin`` of ``prefix``: a chunked numpy min/max over the memory
    map (no Python loop over sequences), cached in ``cache_dir`` by the files' identity (path, size, mtime)."""
    cache = Path(cache_dir) / f"token_range_{_file_key(prefix)}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            lo, hi = json.loads(cache.read_text())["range"]
            return int(lo), int(hi)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: recompute
    indexed = IndexedDataset(prefix)
    tokens = np.memmap(data_file_path(prefix), mode="r", dtype=indexed.dtype) if indexed.num_tokens else None
    lo, hi = 0, 0
    for start in range(0, indexed.num_tokens, MAX_ID_CHUNK):
        chunk = tokens[start : start + MAX_ID_CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"prefix": prefix, "range": [lo, hi]}))
            os.replace(tmp, cache)
        except OSError:
            pass  # an unwritable cache directory only costs the next start-up another pass
    return lo, hi


def _check_vocab(cfg: Config, prefixes: list[str], cache_dir: str | None = None) -> None:
    """Every token id of every dataset is in ``[0, model.vocab_size)``: checked over the whole files at start-up
    (cached), so an out-of-range id cannot end the run mid-way with an IndexError or a device assert."""
    for prefix in prefixes:
        lo, hi = token_id_range(prefix, cache_dir)
        if hi >= cfg.model.vocab_size or lo < 0:
            bad = hi if hi >= cfg.model.vocab_size else lo
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} but {prefix} holds token id {bad}: "
                f"set model.vocab_size to the tokenizer's vocabulary size (at least {hi + 1}) or "
                f"re-tokenise the data with the model's tokenizer"
            )


def _check_tokenizer(cfg: Config) -> None:
    """When ``data.tokenizer`` names a tokenizer (not the default placeholder), its vocabulary must fit the model."""
    spec = cfg.data.tokenizer
    if not spec or spec == DataConfig.tokenizer:
        return
    try:
        tok = load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.tokenizer = {spec!r}: {e}") from e
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer = {spec!r} has {tok.vocab_size} tokens but model.vocab_size = "
            f"{cfg.model.vocab_size}: set model.vocab_size to at least {tok.vocab_size}"
        )


def _one_sample(d: DataConfig, layout: str) -> str:
    """What one sample takes, as the messages about too little data say it."""
    if layout == "concat":
        return f"data.seq_len + 1 = {d.seq_len + 1} tokens"
    return f"data.seq_len = {d.seq_len} input positions (data.packing = reference)"


def validation_off_note(cfg: Config, data: DataBundle) -> str | None:
    """One start-up line when ``train.eval_interval`` asks for validation but the held-out documents are too short
    for one sample (validation would silently never run); None otherwise, and when data.valid_fraction is 0."""
    plan = data.plan
    if data.valid is not None or plan is None or not plan.valid_tokens:
        return None
    if not cfg.train.eval_interval or cfg.data.valid_fraction == 0:
        return None
    n = sum(plan.valid_documents)
    unit = "tokens" if data.packing == "concat" else "input positions"
    where = "" if len(plan.valid_tokens) == 1 else f" in the largest of {len(plan.valid_tokens)} datasets"
    return (
        f"warning: validation never runs: data.valid_fraction = {cfg.data.valid_fraction} holds out {n:,} "
        f"document{'s' if n != 1 else ''} ({max(plan.valid_tokens):,} {unit}{where}), fewer than one sample of "
        f"{_one_sample(cfg.data, data.packing)}; raise data.valid_fraction (or set train.eval_interval=0)"
    )


def build_data(cfg: Config, dp_size: int = 1, extending: bool = False) -> DataBundle:
    """Datasets for ``cfg.data`` (megatron_dual.data.loader): blending by ``data.path`` weights, the unique subset of
    ``budget/R`` tokens repeated exactly ``data.repetitions`` times, train/valid split by documents. ``extending``:
    the run resumes from a checkpoint, so a pinned ``data.budget_tokens`` below what train.steps consumes is kept
    (the data of the run being extended) rather than refused."""
    d = cfg.data
    if not d.path.strip():
        raise ConfigError(
            "data.path is empty: set it to the prefix of a .bin/.idx pair "
            "(e.g. --set data.path=data/corpus_text_document); see tools/preprocess_data.py"
        )
    budget = _run_tokens(cfg, dp_size, extending)
    try:
        entries = parse_data_path(d.path)
    except DataPathError as e:
        raise ConfigError(str(e)) from e
    cache_dir = d.cache_dir or f"{entries[0][1]}_cache"
    layout = d.layout(cfg.objective.recipe)
    try:
        train, valid, fingerprint, plan = build_datasets(
            d.path, d.seq_len, d.seed, d.valid_fraction, budget, d.repetitions, cache_dir=cache_dir, layout=layout
        )
    except ValueError as e:
        named = str(e).startswith("data.path = ")  # the loader's own messages already name the value
        raise ConfigError(str(e) if named else f"data.path = {d.path!r}: {e}") from e
    if len(train) == 0:
        raise ConfigError(f"data.path = {d.path!r}: too few training tokens for one sample of {_one_sample(d, layout)}")
    _check_tokenizer(cfg)
    _check_vocab(cfg, [prefix for _, prefix in entries], cache_dir)
    return DataBundle(train, valid if valid is not None and len(valid) else None, fingerprint, plan, layout)


def collate_samples(
    dataset: SampleSource, indices: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(tokens, doc_ids, targets)`` int64 of the given samples: (len(indices), seq_len + 1) and ``targets`` None
    for concatenated packing; (len(indices), seq_len) each for the reference layout."""
    samples = [dataset[i] for i in indices]
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    doc_ids = torch.from_numpy(np.stack([s["doc_ids"] for s in samples]).astype(np.int64))
    if "targets" not in samples[0]:
        return tokens, doc_ids, None
    return tokens, doc_ids, torch.from_numpy(np.stack([s["targets"] for s in samples]).astype(np.int64))


def collate(dataset: SampleSource, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, doc_ids)`` int64 (len(indices), seq_len + 1) of the given samples (concatenated packing only:
    use :func:`collate_samples` for either layout)."""
    tokens, doc_ids, targets = collate_samples(dataset, indices)
    if targets is not None:
        raise ValueError("these samples are packed by the reference layout (they carry targets): use collate_samples")
    return tokens, doc_ids


@dataclass
class StepBatches:
    """This rank's micro-batch slots of one optimizer step, on the device."""

    step: int
    batches: list[ObjectiveBatch]
    flops: float = 0.0  # training FLOPs the slots execute (when the loader was given a cost function)
    start: int = 0  # the loader's consumed samples before this step (where rewind() goes back to)

    def local_tokens(self) -> list[int]:
        """This rank's normaliser contribution per objective, in the order of ``OBJECTIVES``."""
        return [sum(b.n_tokens for b in self.batches if b.objective == o) for o in OBJECTIVES]


class TrainDataLoader:
    """This rank's slots of each optimizer step (see module docstring). ``batches(step)`` is called once per step,
    in order; ``state_dict()`` covers exactly the steps handed out (a prefetched step is not consumed)."""

    def __init__(
        self,
        dataset: SampleSource,
        fingerprint: str,
        schedule: ObjectiveSchedule,
        batcher: ObjectiveBatcher,
        *,
        seed: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        prefetch: bool | None = None,
        cost: Callable[[ObjectiveBatch], float] | None = None,
    ) -> None:
        self.dataset = dataset
        self.schedule = schedule
        self.batcher = batcher
        self.mbs = micro_batch_size
        self.slots = schedule.n_slots
        self.dp_rank = dp_rank
        self.device = torch.device(device)
        packing = getattr(dataset, "layout", "concat")
        self.sampler = ResumableSampler(len(dataset), seed, fingerprint, shuffle=shuffle, packing=packing)
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.cost = cost  # e.g. executed FLOPs of a batch, computed on the host copy (no device read)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, int, Future] | None = None

    @property
    def fingerprint(self) -> str:
        return self.sampler.fingerprint

    @property
    def samples_per_step(self) -> int:
        """Samples of one optimizer step over the whole job (every data-parallel rank's slots)."""
        return self.mbs * self.schedule.total

    def _prepare(self, step: int, start: int) -> tuple[list[ObjectiveBatch], float]:
        indices = self.sampler.indices(start, self.samples_per_step)
        out = []
        for s, objective in enumerate(self.schedule.slots(self.dp_rank, step)):
            g = self.dp_rank * self.slots + s
            tokens, doc_ids, targets = collate_samples(self.dataset, indices[g * self.mbs : (g + 1) * self.mbs])
            batch = self.batcher(objective, tokens, doc_ids, step, g, targets=targets)
            out.append(batch.pin_memory() if self.prefetch and self.device.type == "cuda" else batch)
        return out, sum(self.cost(b) for b in out) if self.cost else 0.0

    def _take_pending(self, step: int, start: int) -> tuple[list[ObjectiveBatch], float] | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        ready = pending[2].result()  # also waits for a stale one, so no two threads prepare at once
        return ready if pending[:2] == (step, start) else None

    def batches(self, step: int) -> StepBatches:
        start = self.sampler.consumed_samples
        host = self._take_pending(step, start)
        if host is None:
            host = self._prepare(step, start)
        self.sampler.consumed_samples = start + self.samples_per_step
        if self.prefetch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="megatron-dual-data")
            nxt = start + self.samples_per_step
            self._pending = (step + 1, nxt, self._pool.submit(self._prepare, step + 1, nxt))
        batches, flops = host
        return StepBatches(step, [b.to(self.device, non_blocking=self.prefetch) for b in batches], flops, start)

    def rewind(self, start: int) -> None:
        """Go back to position ``start`` (a step's ``StepBatches.start``), as if that step's samples were never
        handed out (the divergence guard saves the state before the failed step)."""
        self._take_pending(-1, -1)
        self.sampler.consumed_samples = int(start)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; ValueError naming both fingerprints when the state is of other data."""
        self._take_pending(-1, -1)
        self.sampler.load_state_dict(state)

    def close(self) -> None:
        self._take_pending(-1, -1)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def validation_batches(
    dataset: SampleSource,
    micro_batch_size: int,
    max_batches: int,
    batcher: ObjectiveBatcher,
    dp_rank: int = 0,
    dp_size: int = 1,
    objectives: tuple[str, ...] = TWO_OBJECTIVES,
) -> Iterator[ObjectiveBatch]:
    """Fixed held-out batches of each of ``objectives``: the first ``max_batches`` micro-batches of ``dataset``
    dealt round-robin to the data-parallel ranks, MD masks seeded by the batch's first sample (same on every run)."""
    n = min(len(dataset), max_batches * micro_batch_size)
    for j, start in enumerate(range(0, n, micro_batch_size)):
        if j % dp_size != dp_rank:
            continue
        tokens, doc_ids, targets = collate_samples(dataset, list(range(start, min(n, start + micro_batch_size))))
        for objective in objectives:
            yield batcher(objective, tokens, doc_ids, 0, start, targets=targets)
