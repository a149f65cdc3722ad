"""The two objectives as next-token prediction, and the schedule that realises alpha by allocation.

Both objectives read a packed sample of ``T + 1`` tokens with per-token document ids and produce an
:class:`ObjectiveBatch`: ``input_ids`` (B, T), ``labels`` (B, T) with -100 where nothing is predicted,
``weights`` (B, T) and an :class:`AttentionMask`. Position ``i`` always predicts token ``i + 1``.

* AR: causal mask, label every position whose next token is in the same document; weight 1; normaliser = number of
  labelled positions.
* MD as masked next-token prediction (MNTP): per sequence ``t ~ U(t_min, 1)``; every non-special token is replaced
  by ``<mask>`` independently with probability ``t`` (Bernoulli masking, the forward process of masked diffusion);
  bidirectional mask; label position ``i`` only where token ``i + 1`` was masked (and is in the same document),
  weight ``1/t``; normaliser = number of maskable next-token positions (non-special, same document), so that the
  expectation of the weighted sum equals the summed NLL over all those tokens: L_MD sits on the per-token scale of
  L_AR.

The per-token loss is ``nll + z_loss * logsumexp(logits)^2``; the step loss is
``alpha * L_AR + (1 - alpha) * L_MD`` with each objective normalised by its own token count over the step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction

import torch

from megatron_dual.config import ObjectiveConfig, alpha_to_slots
from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.loss import IGNORE

AR, MD = "ar", "md"
OBJECTIVES = (AR, MD)


@dataclass
class ObjectiveBatch:
    objective: str
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where not predicted
    weights: torch.Tensor  # (B, T) float, 0 where not predicted
    mask: AttentionMask
    n_tokens: int  # this objective's normaliser contribution (see module docstring)

    def map_tensors(self, fn) -> ObjectiveBatch:
        """A copy with ``fn`` applied to every tensor (ids, labels, weights and the mask's tensors)."""
        m = self.mask
        mask = AttentionMask(m.kind, None if m.doc_ids is None else fn(m.doc_ids),
                             None if m.prefix_len is None else fn(m.prefix_len), m.q_offset)
        return ObjectiveBatch(self.objective, fn(self.input_ids), fn(self.labels), fn(self.weights), mask,
                              self.n_tokens)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ObjectiveBatch:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ObjectiveBatch:
        return self.map_tensors(lambda t: t.pin_memory())


def _same_doc(doc_ids: torch.Tensor) -> torch.Tensor:
    return doc_ids[:, 1:] == doc_ids[:, :-1]


def ar_batch(tokens: torch.Tensor, doc_ids: torch.Tensor) -> ObjectiveBatch:
    """Next-token prediction with a causal, document-aware mask."""
    _check_shapes(tokens, doc_ids)
    targets = tokens[:, 1:]
    valid = _same_doc(doc_ids)
    labels = torch.where(valid, targets, torch.full_like(targets, IGNORE))
    return ObjectiveBatch(AR, tokens[:, :-1].clone(), labels, valid.float(),
                          AttentionMask("causal", doc_ids=doc_ids[:, :-1].clone()), int(valid.sum()))


def md_batch(tokens: torch.Tensor, doc_ids: torch.Tensor, generator: torch.Generator, *, mask_token_id: int,
             n_special: int, t_min: float = 1e-3) -> ObjectiveBatch:
    """Masked diffusion as MNTP with a bidirectional, document-aware mask (see module docstring)."""
    _check_shapes(tokens, doc_ids)
    b = tokens.shape[0]
    t = t_min + (1.0 - t_min) * torch.rand(b, 1, generator=generator, dtype=torch.float64)
    maskable = tokens >= n_special
    masked = maskable & (torch.rand(tokens.shape, generator=generator, dtype=torch.float64) < t)
    corrupted = torch.where(masked, torch.full_like(tokens, mask_token_id), tokens)
    same = _same_doc(doc_ids)
    predict = masked[:, 1:] & same
    labels = torch.where(predict, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE))
    weights = torch.where(predict, (1.0 / t).expand_as(predict), torch.zeros((), dtype=torch.float64))
    n_tokens = int((maskable[:, 1:] & same).sum())
    return ObjectiveBatch(MD, corrupted[:, :-1].contiguous(), labels, weights.float(),
                          AttentionMask("bidirectional", doc_ids=doc_ids[:, :-1].clone()), n_tokens)


def _check_shapes(tokens: torch.Tensor, doc_ids: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.shape != doc_ids.shape or tokens.shape[1] < 2:
        raise ValueError(f"expected tokens and doc_ids of one shape (B, T+1) with T >= 1; got "
                         f"{tuple(tokens.shape)} and {tuple(doc_ids.shape)}")


def masking_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """MD masking randomness as a pure function of (seed, step, global slot): resume needs no state, the masks do
    not depend on how the global slots are spread over data-parallel ranks, and tensor-parallel peers draw identical
    masks. (The ``/0/`` in the key is a former rank field, kept so that masks stay what they were.)"""
    digest = hashlib.sha256(f"md-mask/{seed}/0/{step}/{slot}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def make_objective_batch(objective: str, tokens: torch.Tensor, doc_ids: torch.Tensor, cfg: ObjectiveConfig,
                         generator: torch.Generator) -> ObjectiveBatch:
    """The :class:`ObjectiveBatch` of ``objective`` (AR or MD) for packed ``tokens``/``doc_ids`` (B, T + 1)."""
    if objective == AR:
        return ar_batch(tokens, doc_ids)
    if objective == MD:
        return md_batch(tokens, doc_ids, generator, mask_token_id=cfg.mask_token_id, n_special=cfg.n_special,
                        t_min=cfg.t_min)
    raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")


class ObjectiveBatcher:
    """Turns the packed samples of a global slot at a step into that slot's objective batch: MD masks are drawn
    from :func:`masking_generator` ``(seed, step, global_slot)``, so any process computes the same batch."""

    def __init__(self, cfg: ObjectiveConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed

    def __call__(self, objective: str, tokens: torch.Tensor, doc_ids: torch.Tensor, step: int,
                 global_slot: int) -> ObjectiveBatch:
        gen = masking_generator(self.seed, step, global_slot)
        return make_objective_batch(objective, tokens, doc_ids, self.cfg, gen)


class ObjectiveSchedule:
    """Which objective each (rank, micro-batch slot) runs at each step.

    With N ranks and M slots there are S = N*M global slots; alpha must be k/S. Global slot g = rank*M + slot runs MD
    at step s iff ``(g + s) % S < S - k`` when rotating (every slot sees both objectives over S steps), else iff
    ``g < S - k``. Exactly k slots run AR at every step.
    """

    def __init__(self, alpha: float, n_ranks: int = 1, n_slots: int = 1, rotate: bool = True) -> None:
        if n_ranks < 1 or n_slots < 1:
            raise ValueError(f"n_ranks = {n_ranks} and n_slots = {n_slots} must both be >= 1")
        self.total = n_ranks * n_slots
        self.n_ranks, self.n_slots, self.rotate = n_ranks, n_slots, rotate
        self.n_ar = alpha_to_slots(alpha, self.total)
        self.n_md = self.total - self.n_ar
        self.alpha = Fraction(self.n_ar, self.total)

    def objective(self, rank: int, slot: int, step: int) -> str:
        g = rank * self.n_slots + slot
        pos = (g + step) % self.total if self.rotate else g
        return MD if pos < self.n_md else AR

    def slots(self, rank: int, step: int) -> list[str]:
        return [self.objective(rank, s, step) for s in range(self.n_slots)]


def loss_coefficients(alpha: float, ar_tokens: int, md_tokens: int) -> dict[str, float]:
    """Factor applied to each objective's summed per-token loss so that the step loss is
    ``alpha * L_AR + (1 - alpha) * L_MD`` with each L normalised by its own token count."""
    return {
        AR: alpha / ar_tokens if ar_tokens > 0 else 0.0,
        MD: (1.0 - alpha) / md_tokens if md_tokens > 0 else 0.0,
    }
