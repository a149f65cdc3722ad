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

* prefix-LM: per sequence a prefix of ``floor(f * T)`` positions, ``f ~ U(objective.prefix_range)``, attended
  bidirectionally (within documents), the rest causally; label only the continuation (position ``i`` where token
  ``i + 1`` lies after the prefix); weight 1; normaliser = labelled positions, the per-token scale of AR.

The per-token loss is ``nll + z_loss * logsumexp(logits)^2``; the step loss is
``alpha * L_AR + (1 - alpha) * L_MD`` (``sum_o share_o * L_o`` for a three-objective ``objective.mix``) with each
objective normalised by its own token count over the step (``objective.recipe = paper``). ``objective.recipe =
reference`` is the paper's training code instead (:func:`reference_md_batch`, :func:`step_coefficients`).

Samples packed by the reference layout (``data.packing``, megatron_dual.data.packing) carry their targets: inputs,
targets and doc ids of T positions each, every position labelled by the next token of its own document
(:func:`ar_batch_shifted`, :func:`reference_md_batch_shifted`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from megatron_dual.config import ALPHA_MAX_DENOMINATOR, ConfigError, ObjectiveConfig, alpha_to_slots
from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.loss import IGNORE

AR, MD, PREFIX = "ar", "md", "prefix"
OBJECTIVES = (AR, MD, PREFIX)  # row order of per-objective sums (StepTotals, token counts, validation)
TWO_OBJECTIVES = (AR, MD)  # what a run without objective.mix trains (and validates)
ALLOCATION_ORDER = (MD, AR, PREFIX)  # rotated slot position p runs MD below n_md, then AR, then prefix
RECIPES = ("paper", "reference")  # objective.recipe
ROTATIONS = ("step", "epoch", "none")  # objective.rotate (true/false are read as step/none)
REFERENCE_AR_WEIGHT = 2.0  # run_pretraining.py: `weight = 2.0` in the causal branch of the loss
REFERENCE_MASK_SMOOTHING = 1e-4  # dataset.py: real_mask_p = (1 - 1e-4) * real_mask_p + 1e-4


@dataclass
class ObjectiveBatch:
    objective: str
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE where not predicted
    weights: torch.Tensor  # (B, T) float, 0 where not predicted
    mask: AttentionMask
    n_tokens: int  # this objective's normaliser contribution (see module docstring)
    n_labelled: int | None = None  # positions with a label, counted on the host at construction (see loss.py)

    def __post_init__(self) -> None:
        if self.n_labelled is None and self.labels.device.type == "cpu":
            self.n_labelled = int((self.labels != IGNORE).sum())

    def map_tensors(self, fn) -> ObjectiveBatch:
        """A copy with ``fn`` applied to every tensor (ids, labels, weights and the mask's tensors)."""
        m = self.mask
        mask = AttentionMask(
            m.kind,
            None if m.doc_ids is None else fn(m.doc_ids),
            None if m.prefix_len is None else fn(m.prefix_len),
            m.q_offset,
        )
        return ObjectiveBatch(
            self.objective, fn(self.input_ids), fn(self.labels), fn(self.weights), mask, self.n_tokens, self.n_labelled
        )

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
    return ObjectiveBatch(
        AR,
        tokens[:, :-1].clone(),
        labels,
        valid.float(),
        AttentionMask("causal", doc_ids=doc_ids[:, :-1].clone()),
        int(valid.sum()),
    )


def md_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_token_id: int,
    n_special: int,
    t_min: float = 1e-3,
) -> ObjectiveBatch:
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
    return ObjectiveBatch(
        MD,
        corrupted[:, :-1].contiguous(),
        labels,
        weights.float(),
        AttentionMask("bidirectional", doc_ids=doc_ids[:, :-1].clone()),
        n_tokens,
    )


def _check_shapes(tokens: torch.Tensor, doc_ids: torch.Tensor) -> None:
    if tokens.dim() != 2 or tokens.shape != doc_ids.shape or tokens.shape[1] < 2:
        raise ValueError(
            f"expected tokens and doc_ids of one shape (B, T+1) with T >= 1; got "
            f"{tuple(tokens.shape)} and {tuple(doc_ids.shape)}"
        )


def masking_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """MD masking randomness as a pure function of (seed, step, global slot): resume needs no state, the masks do
    not depend on how the global slots are spread over data-parallel ranks, and tensor-parallel peers draw identical
    masks. (The ``/0/`` in the key is a former rank field, kept so that masks stay what they were.)"""
    digest = hashlib.sha256(f"md-mask/{seed}/0/{step}/{slot}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def reference_md_batch(
    tokens: torch.Tensor, doc_ids: torch.Tensor, generator: torch.Generator, *, mask_token_id: int, n_special: int
) -> ObjectiveBatch:
    """MD as the paper's training code draws it (``objective.recipe = reference``; dataset.py,
    ``DiffusionMaskingStrategy`` and ``DiffusionDatasetv2.apply_mask``), per sequence of T inputs:

    * every input position gets a ratio ~ U(0, 1), special tokens (id < n_special) +inf; t ~ U(0, 1) and exactly
      ``k = max(1, floor(T t + U))`` positions are masked: those with the k smallest ratios (``topk`` then
      ``ratios <= k-th``), so when k exceeds the maskable count the threshold is +inf and every position, special
      tokens too, is masked;
    * position i is labelled iff input i + 1 was masked, and the last position always (``target_mask =
      cat([mask[1:], True])``); here, on the concatenated layout (``data.packing = concat``), also only inside one
      document (the reference layout: :func:`reference_md_batch_shifted`);
    * every label weighs ``1 / ((1 - 1e-4) m / T + 1e-4)`` with m the realised number of masked positions;
    * the normaliser is all B x T positions (run_pretraining.py: ``loss / input_ids.numel()``)."""
    _check_shapes(tokens, doc_ids)
    predict_doc = _same_doc(doc_ids)
    return _reference_md(
        tokens[:, :-1], tokens[:, 1:], doc_ids[:, :-1], predict_doc, generator, mask_token_id, n_special
    )


def _reference_md(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    doc_ids: torch.Tensor,
    allowed: torch.Tensor | None,
    generator: torch.Generator,
    mask_token_id: int,
    n_special: int,
) -> ObjectiveBatch:
    """The reference's MD draw on T ``inputs`` with their ``targets``; ``allowed`` (or None: everywhere) limits the
    labelled positions (the concatenated layout: targets in the same document)."""
    b, t_len = inputs.shape
    ratios = torch.rand(inputs.shape, generator=generator, dtype=torch.float64)
    ratios = torch.where(inputs < n_special, torch.full_like(ratios, math.inf), ratios)
    t = torch.rand(b, generator=generator, dtype=torch.float64)
    u = torch.rand(b, generator=generator, dtype=torch.float64)
    k = torch.clamp(torch.floor(t_len * t + u).long(), 1, t_len)
    threshold = ratios.sort(dim=1).values.gather(1, (k - 1)[:, None])
    masked = ratios <= threshold
    frac = masked.sum(dim=1, keepdim=True).double() / t_len
    weight = 1.0 / ((1.0 - REFERENCE_MASK_SMOOTHING) * frac + REFERENCE_MASK_SMOOTHING)
    last = torch.ones(b, 1, dtype=torch.bool)
    predict = torch.cat([masked[:, 1:], last], dim=1)
    if allowed is not None:
        predict = predict & allowed
    labels = torch.where(predict, targets, torch.full_like(targets, IGNORE))
    weights = torch.where(predict, weight.expand_as(predict), torch.zeros((), dtype=torch.float64))
    corrupted = torch.where(masked, torch.full_like(inputs, mask_token_id), inputs)
    return ObjectiveBatch(
        MD,
        corrupted.contiguous(),
        labels,
        weights.float(),
        AttentionMask("bidirectional", doc_ids=doc_ids.clone()),
        b * t_len,
    )


def _check_shifted(inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> None:
    if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.shape != doc_ids.shape or inputs.shape[1] < 1:
        raise ValueError(
            f"expected inputs, targets and doc_ids of one shape (B, T) with T >= 1; got {tuple(inputs.shape)}, "
            f"{tuple(targets.shape)} and {tuple(doc_ids.shape)}"
        )


def ar_batch_shifted(inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> ObjectiveBatch:
    """AR on the reference layout: causal, document-aware mask; every position predicts its target (the next token
    of its own document, a document's final token included); weight 1; normaliser B x T (= the labelled count)."""
    _check_shifted(inputs, targets, doc_ids)
    return ObjectiveBatch(
        AR,
        inputs.clone(),
        targets.clone(),
        torch.ones(inputs.shape, dtype=torch.float32),
        AttentionMask("causal", doc_ids=doc_ids.clone()),
        inputs.numel(),
    )


def reference_md_batch_shifted(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    doc_ids: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_token_id: int,
    n_special: int,
) -> ObjectiveBatch:
    """The reference's MD on its own layout, exactly as ``DiffusionDatasetv2.apply_mask`` computes it from its inputs
    and targets: the masks of :func:`reference_md_batch` drawn on the T inputs, position i labelled with its target
    iff input i + 1 was masked, and the last position always (``target_mask = cat([mask[1:], True])``), with no
    further condition: a document's last input is labelled (by the document's final token) when the next
    document's first input was masked (only when every position is, as it is special)."""
    _check_shifted(inputs, targets, doc_ids)
    return _reference_md(inputs, targets, doc_ids, None, generator, mask_token_id, n_special)


def prefix_batch(
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    generator: torch.Generator,
    prefix_range: tuple[float, float] = (0.0, 1.0),
) -> ObjectiveBatch:
    """Prefix-LM: per sequence ``P = floor(f T)``, ``f ~ U(prefix_range)``; inputs ``0 .. P-1`` attend to each other
    bidirectionally (within documents, the prefix mask of :class:`AttentionMask`), the rest causally; position i
    is labelled iff its target ``i + 1`` lies in the continuation (``i >= P - 1``) and in the same document, so
    no prediction sees its own target. Weight 1, normaliser = labelled positions (the per-token scale of AR)."""
    _check_shapes(tokens, doc_ids)
    b, t_len = tokens.shape[0], tokens.shape[1] - 1
    lo, hi = prefix_range
    f = lo + (hi - lo) * torch.rand(b, generator=generator, dtype=torch.float64)
    plen = torch.clamp(torch.floor(f * t_len).long(), 0, t_len)
    pos = torch.arange(t_len)
    valid = _same_doc(doc_ids) & (pos[None, :] >= plen[:, None] - 1)
    labels = torch.where(valid, tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE))
    mask = AttentionMask("prefix", doc_ids=doc_ids[:, :-1].clone(), prefix_len=plen)
    return ObjectiveBatch(PREFIX, tokens[:, :-1].clone(), labels, valid.float(), mask, int(valid.sum()))


def _shifted_batch(
    objective: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    doc_ids: torch.Tensor,
    cfg: ObjectiveConfig,
    generator: torch.Generator,
) -> ObjectiveBatch:
    if objective == AR:
        return ar_batch_shifted(inputs, targets, doc_ids)
    if objective == MD and cfg.recipe == "reference":
        return reference_md_batch_shifted(
            inputs, targets, doc_ids, generator, mask_token_id=cfg.mask_token_id, n_special=cfg.n_special
        )
    raise ValueError(
        f"objective {objective!r} under objective.recipe = {cfg.recipe} has no form on the reference packing "
        f"(data.packing = reference trains AR and the reference recipe's MD)"
    )


def make_objective_batch(
    objective: str,
    tokens: torch.Tensor,
    doc_ids: torch.Tensor,
    cfg: ObjectiveConfig,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
) -> ObjectiveBatch:
    """The :class:`ObjectiveBatch` of ``objective`` for packed ``tokens``/``doc_ids`` (B, T + 1), under
    ``cfg.recipe`` (paper: the module docstring; reference: AR normalised by B x T positions, MD as
    :func:`reference_md_batch`). With ``targets`` the samples are of the reference layout: ``tokens``,
    ``targets`` and ``doc_ids`` (B, T) (:func:`ar_batch_shifted`, :func:`reference_md_batch_shifted`)."""
    if targets is not None:
        return _shifted_batch(objective, tokens, targets, doc_ids, cfg, generator)
    reference = cfg.recipe == "reference"
    if objective == AR:
        batch = ar_batch(tokens, doc_ids)
        if reference:  # run_pretraining.py divides every objective by input_ids.numel(): all B x T positions
            batch.n_tokens = batch.input_ids.numel()
        return batch
    if objective == MD:
        if reference:
            return reference_md_batch(
                tokens, doc_ids, generator, mask_token_id=cfg.mask_token_id, n_special=cfg.n_special
            )
        return md_batch(
            tokens, doc_ids, generator, mask_token_id=cfg.mask_token_id, n_special=cfg.n_special, t_min=cfg.t_min
        )
    if objective == PREFIX:
        return prefix_batch(tokens, doc_ids, generator, tuple(cfg.prefix_range))
    raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")


class ObjectiveBatcher:
    """Turns the packed samples of a global slot at a step into that slot's objective batch: MD masks are drawn
    from :func:`masking_generator` ``(seed, step, global_slot)``, so any process computes the same batch."""

    def __init__(self, cfg: ObjectiveConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed

    def __call__(
        self,
        objective: str,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor,
        step: int,
        global_slot: int,
        targets: torch.Tensor | None = None,
    ) -> ObjectiveBatch:
        gen = masking_generator(self.seed, step, global_slot)
        return make_objective_batch(objective, tokens, doc_ids, self.cfg, gen, targets)


# ---------------------------------------------------------------------------------------------------- the mix


def _fraction(text: str, field_name: str, where: str) -> Fraction:
    try:
        value = Fraction(text.strip()).limit_denominator(ALPHA_MAX_DENOMINATOR)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{field_name}: {where}: {text.strip()!r} is not a number or fraction") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"{field_name}: {where}: {value} is outside [0, 1]")
    return value


def parse_mix(text: str, field_name: str = "objective.mix") -> dict[str, Fraction]:
    """``"ar=3/4 md=1/8 prefix=1/8"`` -> {objective: share}; the shares must sum to exactly 1."""
    mix: dict[str, Fraction] = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep or name not in OBJECTIVES:
            raise ConfigError(
                f"{field_name} = {text!r}: {item!r} is not objective=share with objective one of "
                f'{", ".join(OBJECTIVES)} (e.g. "ar=3/4 md=1/8 prefix=1/8")'
            )
        if name in mix:
            raise ConfigError(f"{field_name} = {text!r}: {name} is given twice")
        mix[name] = _fraction(value, f"{field_name} = {text!r}", f"the share of {name}")
    if sum(mix.values()) != 1:
        raise ConfigError(f"{field_name} = {text!r}: the shares sum to {sum(mix.values())}, not 1")
    return mix


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha over steps: ``points`` [(first step, alpha)] piecewise constant, or ``linear`` from ``points[0]`` at step
    0 to ``points[1]`` at the last step."""

    points: tuple[tuple[int, Fraction], ...]
    linear: bool = False
    text: str = ""  # as written in the config

    def at(self, step: int, total_steps: int) -> Fraction:
        """The nominal alpha of (0-based) ``step``: exact for piecewise constant, a fraction of the linear value."""
        if self.linear:
            (_, a0), (_, a1) = self.points
            frac = Fraction(step, max(1, total_steps - 1))
            return a0 + (a1 - a0) * min(Fraction(1), frac)
        value = self.points[0][1]
        for first, alpha in self.points:
            if step >= first:
                value = alpha
        return value


def parse_alpha_schedule(text: str, field_name: str = "objective.alpha_schedule") -> AlphaSchedule:
    """``"3/4"`` (constant), ``"0:1, 6144:63/64"`` (piecewise constant: from step 0 alpha 1, from step 6144 alpha
    63/64; steps are 0-based optimizer steps, increasing, the first 0) or ``"linear 1 -> 1/8"`` (over the run)."""
    body = text.strip()
    if body.startswith("linear"):
        ends = body[len("linear") :].split("->")
        if len(ends) != 2:
            raise ConfigError(
                f"{field_name} = {text!r}: a linear schedule reads 'linear A -> B' (e.g. 'linear 1 -> 1/8')"
            )
        a0, a1 = (_fraction(e, f"{field_name} = {text!r}", f"linear end {i + 1}") for i, e in enumerate(ends))
        return AlphaSchedule(((0, a0), (-1, a1)), linear=True, text=body)
    points: list[tuple[int, Fraction]] = []
    for i, item in enumerate(x for x in body.split(",")):
        step_text, sep, value = item.rpartition(":") if ":" in item else ("0", ":", item)
        where = f"item {i + 1} ({item.strip()!r})"
        if not step_text.strip().isdigit():
            raise ConfigError(f"{field_name} = {text!r}: {where}: expected step:alpha with a whole step number")
        step = int(step_text)
        if (not points and step != 0) or (points and step <= points[-1][0]):
            raise ConfigError(f"{field_name} = {text!r}: {where}: steps must start at 0 and increase")
        points.append((step, _fraction(value, f"{field_name} = {text!r}", where)))
    if not points:
        raise ConfigError(f"{field_name} = {text!r}: empty schedule")
    return AlphaSchedule(tuple(points), text=body)


def realise_shares(shares: Mapping[str, Fraction], total: int, field_name: str) -> dict[str, int]:
    """Slot counts {objective: k} with k / total == share exactly; a ConfigError naming ``field_name`` otherwise."""
    counts = {}
    for obj, share in shares.items():
        k = share * total
        if k.denominator != 1:
            alpha_to_slots(float(share), total, field_name=f"{field_name} ({obj} = {share})")
        counts[obj] = int(k)
    return counts


class ObjectiveSchedule:
    """Which objective each (rank, micro-batch slot) runs at each step.

    With N ranks and M slots there are S = N*M global slots. At step s, ``counts(s)`` slots run each objective
    (alpha = k/S, or an ``objective.mix`` over three objectives, or an alpha schedule: exact per step). Global slot
    g = rank*M + slot takes rotated position p, and p < n_md runs MD, then n_ar positions AR, then prefix:

    * ``rotate = "step"``: p = (g + s) % S (every slot sees every objective over S steps);
    * ``rotate = "epoch"``: p = (g + e) % D with e = s // epoch_steps and D = S / gcd(S, counts) (the reference's
      ``(epoch + rank) % D < N``: an objective is fixed per slot for a data epoch);
    * ``rotate = "none"``: p = g.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        n_ranks: int = 1,
        n_slots: int = 1,
        rotate: bool | str = True,
        *,
        mix: Mapping[str, Fraction] | None = None,
        alpha_schedule: AlphaSchedule | None = None,
        total_steps: int = 1,
        epoch_steps: int = 0,
        field_name: str = "objective.alpha",
    ) -> None:
        if n_ranks < 1 or n_slots < 1:
            raise ValueError(f"n_ranks = {n_ranks} and n_slots = {n_slots} must both be >= 1")
        self.total = n_ranks * n_slots
        self.n_ranks, self.n_slots = n_ranks, n_slots
        self.rotate = {True: "step", False: "none"}.get(rotate, rotate) if isinstance(rotate, bool) else rotate
        if self.rotate not in ROTATIONS:
            raise ValueError(f"rotate = {rotate!r}; allowed: {', '.join(ROTATIONS)}")
        self.total_steps, self.epoch_steps = max(1, total_steps), max(1, epoch_steps or total_steps)
        self.alpha_schedule = alpha_schedule
        self.rounding_error = 0.0  # largest |k_s / S - alpha_s| of a linear schedule
        self._fixed: dict[str, int] | None = None
        if alpha_schedule is None:
            shares = dict(mix) if mix else {AR: Fraction(alpha_to_slots(alpha, self.total, field_name), self.total)}
            shares.setdefault(AR, Fraction(0))
            shares.setdefault(MD, 1 - sum(shares.values()))
            self._fixed = realise_shares(shares, self.total, "objective.mix" if mix else field_name)
        else:
            self._check_schedule()
        self.objectives = tuple(o for o in OBJECTIVES if o in (self._fixed or TWO_OBJECTIVES))
        first = self.counts(0)
        self.n_ar, self.n_md = first.get(AR, 0), first.get(MD, 0)
        self.alpha = Fraction(self.n_ar, self.total)  # step 0's (the whole run's when constant)

    def _check_schedule(self) -> None:
        sched = self.alpha_schedule
        if not sched.linear:
            for first, alpha in sched.points:
                if first < self.total_steps:
                    alpha_to_slots(
                        float(alpha),
                        self.total,
                        field_name=f"objective.alpha_schedule (alpha {alpha} from step {first})",
                    )
            return
        for s in range(self.total_steps):
            nominal = sched.at(s, self.total_steps)
            self.rounding_error = max(self.rounding_error, abs(float(self._ar_slots(s) / self.total - nominal)))

    def _ar_slots(self, step: int) -> Fraction:
        nominal = self.alpha_schedule.at(step, self.total_steps)
        return Fraction(math.floor(nominal * self.total + Fraction(1, 2)))

    def counts(self, step: int) -> dict[str, int]:
        """Slots per objective at ``step`` (their sum is S)."""
        if self._fixed is not None:
            return self._fixed
        k = (
            int(self._ar_slots(step))
            if self.alpha_schedule.linear
            else int(self.alpha_schedule.at(step, self.total_steps) * self.total)
        )
        return {AR: k, MD: self.total - k}

    def shares(self, step: int) -> dict[str, Fraction]:
        return {o: Fraction(k, self.total) for o, k in self.counts(step).items()}

    def alpha_at(self, step: int) -> Fraction:
        """The realised alpha (share of AR slots) of ``step``."""
        return Fraction(self.counts(step).get(AR, 0), self.total)

    def objective(self, rank: int, slot: int, step: int) -> str:
        g = rank * self.n_slots + slot
        counts = self.counts(step)
        if self.rotate == "step":
            pos, scale = (g + step) % self.total, 1
        elif self.rotate == "epoch":
            period = self.total // math.gcd(self.total, *counts.values())
            pos, scale = (g + step // self.epoch_steps) % period, self.total // period
        else:
            pos, scale = g, 1
        edge = 0
        for obj in ALLOCATION_ORDER:
            edge += counts.get(obj, 0) // scale
            if pos < edge:
                return obj
        raise AssertionError(f"slot position {pos} beyond the {self.total} slots")

    def slots(self, rank: int, step: int) -> list[str]:
        return [self.objective(rank, s, step) for s in range(self.n_slots)]

    def schedule_note(self) -> str:
        """'' or what to know about the alpha schedule, reported once: for a linear schedule how far the realised
        k_s / S strays from the nominal alpha; for a piecewise one the steps at or past ``train.steps`` (accepted,
        since an extended run reaches them, but not reached in this one)."""
        sched = self.alpha_schedule
        if sched is None:
            return ""
        if sched.linear:
            return (
                f"; the linear schedule is realised as k/{self.total} per step (round half up), largest error "
                f"{self.rounding_error:.4g}"
            )
        late = [f"alpha {alpha} from step {first}" for first, alpha in sched.points if first >= self.total_steps]
        if not late:
            return ""
        return f"; not reached in this run (past train.steps = {self.total_steps}): {', '.join(late)}"


def loss_coefficients(alpha: float, ar_tokens: int, md_tokens: int) -> dict[str, float]:
    """Factor applied to each objective's summed per-token loss so that the step loss is
    ``alpha * L_AR + (1 - alpha) * L_MD`` with each L normalised by its own token count."""
    return {
        AR: alpha / ar_tokens if ar_tokens > 0 else 0.0,
        MD: (1.0 - alpha) / md_tokens if md_tokens > 0 else 0.0,
    }


def step_coefficients(slots: Mapping[str, int], tokens: Mapping[str, int], recipe: str = "paper") -> dict[str, float]:
    """Factor on each objective's summed per-token loss at one step, from the step's slot counts and each
    objective's normaliser summed over the job.

    * paper: ``share_o / tokens_o`` (share = slots_o / S), so the step loss is ``sum_o share_o L_o``; with AR and
      MD only exactly :func:`loss_coefficients` (the MD share as ``1 - alpha`` in floats, as always);
    * reference: ``w_o / (all positions of the step)`` with w = 2.0 for AR and 1 for MD (run_pretraining.py:
      ``weight = 2.0``, ``loss / input_ids.numel()``, gradients averaged over ranks and accumulation steps).
    """
    total = sum(slots.values())
    if recipe == "reference":
        positions = sum(tokens.values())
        return {o: (REFERENCE_AR_WEIGHT if o == AR else 1.0) / positions if positions else 0.0 for o in OBJECTIVES}
    if set(k for k, v in slots.items() if v) <= {AR, MD}:
        alpha = float(Fraction(slots.get(AR, 0), total))
        return {**loss_coefficients(alpha, tokens.get(AR, 0), tokens.get(MD, 0)), PREFIX: 0.0}
    return {o: float(Fraction(slots.get(o, 0), total)) / tokens[o] if tokens.get(o) else 0.0 for o in OBJECTIVES}


def effective_alpha(alpha: Fraction, recipe: str = "paper") -> Fraction:
    """The AR weight of the objective actually optimised, as a share of AR + MD: alpha itself under the paper
    recipe; under the reference recipe (AR tokens weigh 2.0, both over B x T positions) ``2 alpha / (1 + alpha)``,
    i.e. ``2 (1 - r) / (2 - r)`` for a share r of MD slots (63/64 -> 126/127)."""
    alpha = Fraction(alpha)
    if recipe == "reference":
        return 2 * alpha / (1 + alpha)
    return alpha


def schedule_from_config(
    cfg: ObjectiveConfig,
    n_ranks: int,
    n_slots: int,
    total_steps: int,
    repetitions: int = 0,
    field_name: str = "objective.alpha",
) -> ObjectiveSchedule:
    """The :class:`ObjectiveSchedule` of a (validated) ``objective`` section on ``n_ranks`` x ``n_slots``; an epoch
    (for ``rotate = epoch``) is ``objective.epoch_steps`` or train.steps / R (the reference's ``steps_in_epoch =
    int(max_steps / n_repetitions)``)."""
    mix = parse_mix(cfg.mix) if cfg.mix else None
    sched = parse_alpha_schedule(cfg.alpha_schedule) if cfg.alpha_schedule else None
    epoch = cfg.epoch_steps or int(total_steps / max(1, repetitions))
    return ObjectiveSchedule(
        cfg.alpha,
        n_ranks,
        n_slots,
        cfg.rotate,
        mix=mix,
        alpha_schedule=sched,
        total_steps=total_steps,
        epoch_steps=epoch,
        field_name=field_name,
    )


def realised_segments(schedule: ObjectiveSchedule, recipe: str = "paper") -> list[dict]:
    """The realised allocation over the run as runs of equal slot counts: [{first, last, counts, alpha,
    effective}] (one row for a constant alpha or mix)."""
    rows: list[dict] = []
    for step in range(schedule.total_steps):
        counts = schedule.counts(step)
        if rows and rows[-1]["counts"] == counts:
            rows[-1]["last"] = step
            continue
        alpha = schedule.alpha_at(step)
        rows.append(
            {"first": step, "last": step, "counts": counts, "alpha": alpha, "effective": effective_alpha(alpha, recipe)}
        )
    return rows


def describe_objective(cfg: ObjectiveConfig, schedule: ObjectiveSchedule, max_rows: int = 12) -> list[str]:
    """Lines for ``megatron-dual info`` and the planner: the recipe, the nominal (realised) and the effective alpha
    per run of steps of equal allocation."""
    weights = (
        "AR tokens x 2.0, MD 1/(smoothed mask fraction), all over B x T"
        if cfg.recipe == "reference"
        else "each objective over its own tokens"
    )
    lines = [f"recipe {cfg.recipe} ({weights}); {schedule.total} slots, rotate = {schedule.rotate}"]
    rows = realised_segments(schedule, cfg.recipe)
    shown = rows if len(rows) <= max_rows else rows[: max_rows // 2] + [None] + rows[-(max_rows // 2) :]
    for row in shown:
        if row is None:
            lines.append(f"  ... {len(rows) - 2 * (max_rows // 2)} more runs of steps ...")
            continue
        split = " + ".join(f"{row['counts'].get(o, 0)} {o.upper()}" for o in schedule.objectives)
        steps = f"steps {row['first']}-{row['last']}: " if len(rows) > 1 else ""
        lines.append(
            f"  {steps}nominal alpha {row['alpha']} = {float(row['alpha']):.6g} ({split}); effective alpha "
            f"{row['effective']} = {float(row['effective']):.6g}"
        )
    note = schedule.schedule_note()
    if note:
        lines.append(f"  {note.lstrip('; ')}")
    return lines
