"""Masked-diffusion generation and infilling: unmask the ``<mask>`` tokens of each prompt, plus a span of
``length`` masks appended to it, over ``steps`` iterations with bidirectional attention (the samplers of LLaDA /
MDLM / MegaDLMs, written for MNTP).

The positions to fill of a row are its prompt's own mask positions (anywhere after the first token, several spans
allowed) followed by the appended span, in order; :func:`diffusion_generate` returns the appended span,
:func:`diffusion_infill` the whole row. Each iteration runs the trunk over the whole sequence (the still-masked
positions included) and reads the prediction for every still-masked position j from the head at position j - 1
(MNTP: the hidden state at i predicts the token at i + 1), so the head runs only on the rows of the current block,
never on the full sequence; a mask at a row's position 0 has nothing before it and is an error. A candidate token
is drawn for every masked position of the current block (greedy at ``temperature=0``, else sampled from
softmax(logits / temperature) under top-k / top-p), and the ``k`` positions with the highest score keep theirs; the
rest are masked again:

* ``remasking="confidence"`` (LLaDA's low-confidence remasking): score = probability of the drawn token under the
  untempered distribution;
* ``remasking="random"`` (MDLM's ancestral order): score = uniform noise, so positions unmask in random order.

Schedule (:func:`row_schedule`, per row, over its n positions to fill): ``block_length`` B cuts them, in order,
into blocks of B (the last one may be shorter; ``block_length=0``: one block), filled semi-autoregressively left
to right, later blocks staying masked but attended to (LLaDA's semi-AR sampling). ``steps`` (0: one per position
to fill) is split over the blocks as evenly as possible (the first blocks take the remainder) and a block of m
masks over s steps unmasks m // s per step, the first m % s steps one more (LLaDA's linear schedule), so a block
with fewer masks than steps is full after m steps and the rest are skipped. Rows of a batch may have different
numbers of masks: each follows its own schedule, an iteration runs while any row has something to unmask.

Special tokens (ids below ``n_special``: ``<s>``, ``</s>``, ``<mask>``...) are never produced: MNTP training never
masks them, so the head was never trained to predict them at a masked position. Batches of prompts are left-padded
as in :mod:`.generate` (pads in their own document, RoPE positions from each row's first token), so a row computes
what it computes alone. All randomness comes from ``generator``: a fixed seed gives a fixed output.

:mod:`.fill_mask` is the one-step reading of the same model: one forward, every mask's distribution read at once
(each given all the others still masked); diffusion with ``steps=1``, ``temperature=0`` puts the argmax over
non-special ids at every mask, the same tokens. More steps condition later masks on the tokens already filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_dual.inference.fill_mask import MASK_TEXT, encode_with_masks
from megatron_dual.inference.generate import filter_logits, prompt_lists
from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer

__all__ = [
    "DiffusionConfig",
    "transfer_schedule",
    "row_schedule",
    "diffusion_generate",
    "diffusion_infill",
    "infill_text",
]

REMASKING = ("confidence", "random")


@dataclass
class DiffusionConfig:
    """Sampler settings: ``length`` masks appended to each prompt (0: fill only the prompt's own masks);
    ``steps=0``: one step per position to fill; ``block_length=0``: one block (all positions to fill)."""

    length: int = 0
    steps: int = 0
    block_length: int = 0
    remasking: str = "confidence"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    mask_id: int = 4
    n_special: int = 16

    def validate(self, vocab: int) -> None:
        for name in ("length", "steps", "block_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"diffusion: {name} = {getattr(self, name)} must be >= 0")
        if self.remasking not in REMASKING:
            raise ValueError(f"diffusion: remasking = {self.remasking!r}; allowed: {', '.join(REMASKING)}")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"diffusion: temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0:  # checked at temperature 0 too, as generate does
            raise ValueError(f"diffusion: top_p = {self.top_p} must be in (0, 1] and top_k = {self.top_k} >= 0")
        if not 0 <= self.mask_id < vocab or not 0 <= self.n_special < vocab:
            raise ValueError(f"diffusion: mask_id {self.mask_id} / n_special {self.n_special} outside vocab {vocab}")


def transfer_schedule(n_masks: int, steps: int) -> list[int]:
    """Tokens to unmask at each of ``steps`` steps for a block of ``n_masks`` (sums to ``n_masks``)."""
    base, extra = divmod(n_masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def row_schedule(n_masks: int, cfg: DiffusionConfig) -> list[tuple[int, int, int]]:
    """One row's steps as (lo, hi, k): unmask ``k`` of the row's positions to fill number lo..hi-1 (its block).

    Steps that would unmask nothing (a block with fewer masks than steps) are left out."""
    block = cfg.block_length or n_masks
    bounds = [(lo, min(lo + block, n_masks)) for lo in range(0, n_masks, block)]
    steps = cfg.steps or n_masks
    if steps < len(bounds):
        raise ValueError(
            f"diffusion: steps = {steps} are fewer than the {len(bounds)} blocks of {n_masks} masks "
            f"(block_length {cfg.block_length})"
        )
    plan = []
    for (lo, hi), s in zip(bounds, transfer_schedule(steps, len(bounds)), strict=True):
        plan += [(lo, hi, k) for k in transfer_schedule(hi - lo, s) if k]
    return plan


def _draw(
    logits: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens (B, L) and their scores (B, L) from block logits (B, L, V)."""
    logits = logits.float()
    logits[..., : cfg.n_special] = float("-inf")
    if cfg.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logits / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        probs = filtered.softmax(dim=-1).flatten(0, 1)
        tokens = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])
    if cfg.remasking == "confidence":
        score = logits.softmax(dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    else:
        score = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    return tokens, score


@dataclass
class _Layout:
    """Left-padded ids (B, P + L) with the appended span, the bidirectional mask, the RoPE positions (or None),
    each row's pad count and its positions to fill (absolute, in order)."""

    ids: torch.Tensor
    mask: AttentionMask
    positions: torch.Tensor | None
    pads: list[int]
    fills: list[list[int]]


def _layout(prompts: list[list[int]], cfg: DiffusionConfig, device: torch.device) -> _Layout:
    longest = max(len(p) for p in prompts)
    total = longest + cfg.length
    ids = torch.full((len(prompts), total), cfg.mask_id, dtype=torch.long, device=device)
    pads = [longest - len(p) for p in prompts]
    fills = []
    for b, p in enumerate(prompts):
        ids[b, : pads[b]] = 0
        ids[b, pads[b] : longest] = torch.tensor(p, dtype=torch.long, device=device)
        own = [pads[b] + j for j, t in enumerate(p) if t == cfg.mask_id]
        fills.append(own + list(range(longest, total)))
    if not any(pads):
        return _Layout(ids, AttentionMask("bidirectional"), None, pads, fills)
    arange = torch.arange(total, device=device)[None, :]
    pad_t = torch.tensor(pads, device=device)[:, None]
    docs = (arange >= pad_t).long()
    mask = AttentionMask("bidirectional", doc_ids=docs)
    return _Layout(ids, mask, (arange - pad_t).clamp(min=0), pads, fills)


def _check_row(i: int, p: list[int], cfg: DiffusionConfig, vocab: int) -> None:
    if not p:
        raise ValueError(
            f"diffusion: prompt {i} is empty (it needs at least one token, e.g. <s>: MNTP reads "
            "the first masked position's prediction at the position before it)"
        )
    bad = [x for x in p if not 0 <= x < vocab]
    if bad:
        raise ValueError(f"diffusion: prompt {i} has token id {bad[0]} outside [0, {vocab})")
    if p[0] == cfg.mask_id:
        raise ValueError(
            f"diffusion: prompt {i} starts with <mask> (id {cfg.mask_id}): a mask at position 0 cannot be "
            "predicted (MNTP reads the prediction for position j at j - 1); start it with <s>"
        )
    if cfg.length == 0 and cfg.mask_id not in p:
        raise ValueError(f"diffusion: prompt {i} has no <mask> (id {cfg.mask_id}) and length = 0: nothing to fill")


def _plans(model: DualTransformer, prompts: list[list[int]], cfg: DiffusionConfig) -> list[list[tuple[int, int, int]]]:
    """Check the prompts; each row's :func:`row_schedule`."""
    if not prompts:
        raise ValueError("diffusion: no prompts given")
    for i, p in enumerate(prompts):
        _check_row(i, p, cfg, model.cfg.vocab_size)
    longest = max(len(p) for p in prompts)
    if longest + cfg.length > model.cfg.max_seq_len:
        raise ValueError(
            f"diffusion: prompt length {longest} + length {cfg.length} = {longest + cfg.length} "
            f"exceeds model.max_seq_len = {model.cfg.max_seq_len}"
        )
    return [row_schedule(p.count(cfg.mask_id) + cfg.length, cfg) for p in prompts]


def _step_blocks(
    lay: _Layout, plans: list[list[tuple[int, int, int]]], step: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For iteration ``step``: each row's block positions (B, W), which of them are real (B, W), its k (B,).

    A row that is done (or shorter) has k = 0 and no real column; padding columns point at position 1."""
    entries = [plan[step] if step < len(plan) else (0, 0, 0) for plan in plans]
    width = max(hi - lo for lo, hi, _ in entries)
    device = lay.ids.device
    pos = torch.ones((len(plans), width), dtype=torch.long, device=device)
    real = torch.zeros((len(plans), width), dtype=torch.bool, device=device)
    for b, (lo, hi, _) in enumerate(entries):
        pos[b, : hi - lo] = torch.tensor(lay.fills[b][lo:hi], dtype=torch.long, device=device)
        real[b, : hi - lo] = True
    return pos, real, torch.tensor([k for _, _, k in entries], device=device)


@torch.no_grad()
def diffusion_infill(
    model: DualTransformer,
    prompt_ids: list[list[int]] | torch.Tensor,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Each prompt with its ``<mask>`` tokens filled, followed by ``cfg.length`` filled tokens (the module
    docstring has the sampler); every other token comes back unchanged."""
    prompts = prompt_lists(prompt_ids)
    cfg.validate(model.cfg.vocab_size)
    plans = _plans(model, prompts, cfg)
    lay = _layout(prompts, cfg, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        for step in range(max(len(plan) for plan in plans)):
            _unmask_step(model, lay, _step_blocks(lay, plans, step), cfg, generator)
    finally:
        model.train(was_training)
    return [row[pad:].tolist() for row, pad in zip(lay.ids, lay.pads, strict=True)]


@torch.no_grad()
def diffusion_generate(
    model: DualTransformer,
    prompt_ids: list[list[int]] | torch.Tensor,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Fill a span of ``cfg.length`` masks after each prompt (and the prompt's own masks, see
    :func:`diffusion_infill`); returns the spans."""
    prompts = prompt_lists(prompt_ids)
    rows = diffusion_infill(model, prompts, cfg, generator=generator)
    return [row[len(p) :] for row, p in zip(rows, prompts, strict=True)]


def _unmask_step(
    model: DualTransformer,
    lay: _Layout,
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: DiffusionConfig,
    generator: torch.Generator | None,
) -> None:
    """Unmask ``k[b]`` of row b's block positions ``pos[b]`` in ``lay.ids``, in place (each row has at least
    ``k[b]`` masks left in its block)."""
    pos, real, k = blocks
    ids = lay.ids
    hidden = model(ids, lay.mask, positions=lay.positions)
    before = (pos - 1)[..., None].expand(-1, -1, hidden.shape[-1])  # MNTP: position j is predicted at j - 1
    tokens, score = _draw(model.head(hidden.gather(1, before)), cfg, generator)
    masked = real & (ids.gather(1, pos) == cfg.mask_id)
    score = score.masked_fill(~masked, float("-inf"))
    top = score.topk(int(k.max()), dim=1).indices
    chosen = torch.zeros_like(masked)
    chosen.scatter_(1, top, torch.arange(top.shape[1], device=ids.device)[None, :] < k[:, None])
    rows, cols = (chosen & masked).nonzero(as_tuple=True)
    ids[rows, pos[rows, cols]] = tokens[rows, cols]  # real columns hold distinct positions


def infill_text(
    model: DualTransformer,
    tokenizer: Any,
    prompts: list[str],
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Encode ``prompts`` (with <s>; a literal ``<mask>`` becomes one mask token, see
    :func:`.fill_mask.encode_with_masks`), :func:`diffusion_infill`, and decode each whole filled row."""
    if isinstance(prompts, str):
        raise TypeError("infill_text takes a list of prompt strings, not a single string")
    ids = [encode_with_masks(tokenizer, p) if MASK_TEXT in p else tokenizer.encode(p, add_bos=True) for p in prompts]
    rows = diffusion_infill(model, ids, cfg, generator=generator)
    return [tokenizer.decode(row, skip_special=True) for row in rows]
