"""Named RNG streams for tensor parallelism (Megatron's RNG tracker, without a global instance).

Under TP some random draws must *agree* across the TP peers (anything applied to replicated activations, e.g.
dropout on the residual stream, MD masking) and some must *differ* (anything applied to sharded activations, e.g.
dropout inside attention heads, where each rank holds other heads). The default torch generator stays the
"replicated" stream (seeded identically on every TP rank); :class:`RNGStatesTracker` holds extra named streams and
:meth:`RNGStatesTracker.fork` runs a block with the default generator (CPU and the current CUDA device) swapped
for one of them, saving its advanced state on exit.

Initialisation does not need the tracker: :func:`megatron_dual.parallel.tensor_parallel.parallelize_model` shards
a full model built with the same seed on every rank, so weights equal the single-process model for any TP size.

``tracker = tensor_parallel_rng_tracker(seed, tp_rank)`` gives the stream :data:`TP_RNG` seeded
``seed + 2718 + tp_rank`` (Megatron's offset), different on every TP rank and the same on the DP replicas of a TP
rank. The tracker's state goes into checkpoints via :meth:`get_states` / :meth:`set_states`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["RNGStatesTracker", "TP_RNG", "TP_SEED_OFFSET", "tensor_parallel_rng_tracker"]

TP_RNG = "tensor-parallel"
TP_SEED_OFFSET = 2718


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class RNGStatesTracker:
    """Named generator states; ``with tracker.fork(name):`` draws from stream ``name``."""

    def __init__(self) -> None:
        self._cpu: dict[str, torch.Tensor] = {}
        self._cuda: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return list(self._cpu)

    def add(self, name: str, seed: int) -> None:
        """A new stream ``name`` seeded with ``seed`` (an error if the name or the seed is taken)."""
        if name in self._cpu:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds.values():
            other = next(n for n, s in self._seeds.items() if s == seed)
            raise ValueError(f"seed {seed} is already used by RNG stream {other!r}")
        self._seeds[name] = seed
        self._cpu[name] = torch.Generator().manual_seed(seed).get_state()
        if _cuda_ready():
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            self._cuda[name] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = TP_RNG) -> Iterator[None]:
        """Run the block with the default generators set to stream ``name``; restore them afterwards."""
        if name not in self._cpu:
            raise KeyError(f"RNG stream {name!r} is not tracked (known: {self.names})")
        cpu_saved = torch.get_rng_state()
        cuda_saved = torch.cuda.get_rng_state() if _cuda_ready() else None
        torch.set_rng_state(self._cpu[name])
        if cuda_saved is not None:
            if name not in self._cuda:  # CUDA came up after add(): seed its stream now
                torch.cuda.manual_seed(self._seeds[name])
            else:
                torch.cuda.set_rng_state(self._cuda[name])
        try:
            yield
        finally:
            self._cpu[name] = torch.get_rng_state()
            torch.set_rng_state(cpu_saved)
            if cuda_saved is not None:
                self._cuda[name] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(cuda_saved)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every stream's state (tensors only: ``torch.load(weights_only=True)``-loadable)."""
        return {
            name: {
                "cpu": self._cpu[name].clone(),
                "seed": torch.tensor(self._seeds[name]),
                **({"cuda": self._cuda[name].clone()} if name in self._cuda else {}),
            }
            for name in self._cpu
        }

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._cpu = {n: s["cpu"].clone() for n, s in states.items()}
        self._cuda = {n: s["cuda"].clone() for n, s in states.items() if "cuda" in s}
        self._seeds = {n: int(s["seed"]) for n, s in states.items()}


def tensor_parallel_rng_tracker(seed: int, tp_rank: int) -> RNGStatesTracker:
    """A tracker with :data:`TP_RNG` seeded ``seed + 2718 + tp_rank`` (differs across TP ranks)."""
    tracker = RNGStatesTracker()
    tracker.add(TP_RNG, seed + TP_SEED_OFFSET + tp_rank)
    return tracker
