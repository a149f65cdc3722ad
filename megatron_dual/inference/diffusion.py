"""Masked-diffusion generation: append a span of ``<mask>`` tokens to each prompt and unmask it over ``steps``
iterations with bidirectional attention (the samplers of LLaDA / MDLM / MegaDLMs, written for MNTP).

Each iteration runs the trunk over the whole sequence (prompt + span, the still-masked positions included) and reads
the prediction for every still-masked position j from the head at position j - 1 (MNTP: the hidden state at i
predicts the token at i + 1), so the head runs only on the span's rows, never on the full sequence. A candidate
token is drawn for every masked position of the current block (greedy at ``temperature=0``, else sampled from
softmax(logits / temperature) under top-k / top-p), and the ``k`` positions with the highest score keep theirs; the
rest are masked again:

* ``remasking="confidence"`` (LLaDA's low-confidence remasking): score = probability of the drawn token under the
  untempered distribution;
* ``remasking="random"`` (MDLM's ancestral order): score = uniform noise, so positions unmask in random order.

``k`` per step follows LLaDA's schedule: a block of n masks over s steps unmasks n // s per step, the first
n % s steps one more, so every mask is filled after exactly s steps (the linear schedule of MDLM). With
``block_length < length`` the span is filled semi-autoregressively block by block (left to right, ``steps`` split
evenly over the blocks); positions right of the current block stay masked but are attended to (LLaDA's semi-AR
sampling).

Special tokens (ids below ``n_special``: ``<s>``, ``</s>``, ``<mask>``...) are never produced: MNTP training never
masks them, so the head was never trained to predict them at a masked position. Batches of prompts are left-padded
as in :mod:`.generate` (pads in their own document, RoPE positions from each row's first token), so a row computes
what it computes alone. All randomness comes from ``generator``: a fixed seed gives a fixed output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_dual.inference.generate import filter_logits, prompt_lists
from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer

__all__ = ["DiffusionConfig", "transfer_schedule", "diffusion_generate"]

REMASKING = ("confidence", "random")


@dataclass
class DiffusionConfig:
    """Sampler settings; ``block_length=0`` means one block (the whole span)."""

    length: int
    steps: int
    block_length: int = 0
    remasking: str = "confidence"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    mask_id: int = 4
    n_special: int = 16

    def validate(self, vocab: int) -> None:
        if self.length < 1:
            raise ValueError(f"diffusion: length = {self.length} must be >= 1")
        if self.remasking not in REMASKING:
            raise ValueError(f"diffusion: remasking = {self.remasking!r}; allowed: {', '.join(REMASKING)}")
        block = self.block_length or self.length
        if block < 1 or self.length % block:
            raise ValueError(f"diffusion: block_length = {self.block_length} must divide length = {self.length}")
        blocks = self.length // block
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"diffusion: steps = {self.steps} must be a positive multiple of the {blocks} block(s)")
        if self.steps // blocks > block:
            raise ValueError(f"diffusion: {self.steps // blocks} steps per block exceed the block's {block} masks")
        if self.temperature < 0:
            raise ValueError(f"diffusion: temperature = {self.temperature} must be >= 0 (0 = greedy)")
        if not 0 <= self.mask_id < vocab or not 0 <= self.n_special < vocab:
            raise ValueError(f"diffusion: mask_id {self.mask_id} / n_special {self.n_special} outside vocab {vocab}")


def transfer_schedule(n_masks: int, steps: int) -> list[int]:
    """Tokens to unmask at each of ``steps`` steps for a block of ``n_masks`` (sums to ``n_masks``)."""
    base, extra = divmod(n_masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _draw(
    logits: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens (B, L) and their scores (B, L) from span logits (B, L, V)."""
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


def _layout(
    prompts: list[list[int]], cfg: DiffusionConfig, device: torch.device
) -> tuple[torch.Tensor, AttentionMask, torch.Tensor | None]:
    """Left-padded ids (B, P + L) with the masked span, the bidirectional mask, the RoPE positions (or None)."""
    longest = max(len(p) for p in prompts)
    total = longest + cfg.length
    ids = torch.full((len(prompts), total), cfg.mask_id, dtype=torch.long, device=device)
    pads = torch.tensor([longest - len(p) for p in prompts], device=device)
    for b, p in enumerate(prompts):
        ids[b, : longest - len(p)] = 0
        ids[b, longest - len(p) : longest] = torch.tensor(p, dtype=torch.long, device=device)
    if not bool((pads > 0).any()):
        return ids, AttentionMask("bidirectional"), None
    arange = torch.arange(total, device=device)[None, :]
    docs = (arange >= pads[:, None]).long()
    return ids, AttentionMask("bidirectional", doc_ids=docs), (arange - pads[:, None]).clamp(min=0)


def _check_prompts(model: DualTransformer, prompts: list[list[int]], cfg: DiffusionConfig) -> None:
    if not prompts:
        raise ValueError("diffusion: no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(
                f"diffusion: prompt {i} is empty (it needs at least one token, e.g. <s>: MNTP reads "
                "the first masked position's prediction at the position before it)"
            )
        bad = [x for x in p if not 0 <= x < model.cfg.vocab_size]
        if bad:
            raise ValueError(f"diffusion: prompt {i} has token id {bad[0]} outside [0, {model.cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + cfg.length > model.cfg.max_seq_len:
        raise ValueError(
            f"diffusion: prompt length {longest} + length {cfg.length} = {longest + cfg.length} "
            f"exceeds model.max_seq_len = {model.cfg.max_seq_len}"
        )


@torch.no_grad()
def diffusion_generate(
    model: DualTransformer,
    prompt_ids: list[list[int]] | torch.Tensor,
    cfg: DiffusionConfig,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Fill a span of ``cfg.length`` masks after each prompt (see the module docstring); returns the spans."""
    prompts = prompt_lists(prompt_ids)
    cfg.validate(model.cfg.vocab_size)
    _check_prompts(model, prompts, cfg)
    device = next(model.parameters()).device
    ids, mask, positions = _layout(prompts, cfg, device)
    start = ids.shape[1] - cfg.length
    block = cfg.block_length or cfg.length
    per_block = cfg.steps // (cfg.length // block)
    was_training = model.training
    model.eval()
    try:
        for lo in range(start, ids.shape[1], block):
            for k in transfer_schedule(block, per_block):
                _unmask_step(model, ids, mask, positions, (lo, lo + block), k, cfg, generator)
    finally:
        model.train(was_training)
    return [row.tolist() for row in ids[:, start:]]


def _unmask_step(
    model: DualTransformer,
    ids: torch.Tensor,
    mask: AttentionMask,
    positions: torch.Tensor | None,
    span: tuple[int, int],
    k: int,
    cfg: DiffusionConfig,
    generator: torch.Generator | None,
) -> None:
    """Unmask ``k`` positions of ``ids[:, lo:hi]`` in place (each row has at least ``k`` masks left there)."""
    lo, hi = span
    hidden = model(ids, mask, positions=positions)
    logits = model.head(hidden[:, lo - 1 : hi - 1])  # MNTP: position j is predicted at j - 1
    tokens, score = _draw(logits, cfg, generator)
    masked = ids[:, lo:hi] == cfg.mask_id
    score = score.masked_fill(~masked, float("-inf"))
    chosen = torch.zeros_like(masked)
    chosen.scatter_(1, score.topk(k, dim=1).indices, True)
    chosen &= masked
    ids[:, lo:hi] = torch.where(chosen, tokens, ids[:, lo:hi])
