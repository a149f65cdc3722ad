"""Causal (and prefix-LM) generation with a KV cache, greedy or sampled (temperature, top-k, top-p).

Batches of prompts of different lengths are left-padded: every row is right-aligned at the end of the padded prompt,
pad positions get document id 0 and real tokens document id 1 (the :class:`AttentionMask` document mask keeps pads
and tokens apart), and RoPE positions count from each row's first real token. A row therefore computes exactly
what it would compute alone (up to floating-point summation order); the tests check this against one-by-one
generation and against recomputing the full logits every step.

prefix_lm: the prompt is attended bidirectionally (``AttentionMask("prefix", prefix_len=prompt_len)``) and the
continuation causally. The cached decode is exact: a continuation token never changes the prompt's keys/values,
because prompt queries only see prompt keys under the prefix mask.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer, KVCache

__all__ = ["filter_logits", "sample_next", "generate", "generate_text"]

_PAD = 0  # any valid id; pad positions are masked out of every real token's attention


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus (top-p) set to -inf; shape (..., V) is kept.

    top_k: keep exactly the k largest (0 = off; ties at the boundary are broken by ``torch.topk``).
    top_p: keep the smallest set of most probable tokens whose probability mass reaches ``top_p`` (1 = off); the
    most probable token is always kept. Applied after top-k, on the distribution top-k left (as transformers does).
    """
    if top_k < 0:
        raise ValueError(f"top_k = {top_k} must be >= 0 (0 disables top-k)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p} must be in (0, 1] (1 disables nucleus sampling)")
    out = logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(out, top_k, dim=-1).indices, True)
        out = out.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the tokens before this one already reach top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_prompt_lists(prompt_ids: list[list[int]] | torch.Tensor) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids tensor must be (T,) or (B, T), got shape {tuple(prompt_ids.shape)}")
        return [[int(x) for x in row] for row in prompt_ids.tolist()]
    prompts = [[int(x) for x in p] for p in prompt_ids]
    return prompts


@torch.no_grad()
def generate(
    model: DualTransformer,
    prompt_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    prefix_lm: bool = False,
) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens; returns the new tokens only, one list per prompt.

    A row stops after it produces ``eos_id`` (the eos token is included in its list). ``temperature=0`` is greedy;
    otherwise tokens are sampled from softmax(logits / temperature) restricted by ``top_k`` and ``top_p``, with
    ``generator`` (on the model's device) for reproducible sampling. ``prefix_lm=True`` attends the prompt
    bidirectionally and the continuation causally. ``prompt_ids`` is a list of token-id lists (lengths may differ)
    or a (B, T) / (T,) tensor.
    """
    prompts = _as_prompt_lists(prompt_ids)
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (it needs at least one token, e.g. <s>)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature = {temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p} must be in (0, 1] (1 disables nucleus sampling)")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k} must be >= 0 (0 disables top-k)")
    cfg = model.cfg
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds "
            f"model.max_seq_len = {cfg.max_seq_len}"
        )
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [x for x in p if not 0 <= x < vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token id {bad[0]} outside [0, model.vocab_size = {vocab})")
    batch = len(prompts)
    out: list[list[int]] = [[] for _ in range(batch)]
    if max_new_tokens == 0:
        return out

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    was_training = model.training
    model.eval()
    try:
        pads = torch.tensor([longest - n for n in lengths], device=device)
        padded = any(n != longest for n in lengths)
        ids = torch.full((batch, longest), _PAD, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        total = longest + max_new_tokens
        cache = KVCache.allocate(cfg, batch, total, device, dtype)
        doc_ids: torch.Tensor | None = None
        positions: torch.Tensor | None = None
        if padded:
            doc_ids = (torch.arange(total, device=device)[None, :] >= pads[:, None]).long()
            positions = (torch.arange(longest, device=device)[None, :] - pads[:, None]).clamp(min=0)
        prefix_len = torch.full((batch,), longest, dtype=torch.long, device=device) if prefix_lm else None

        def make_mask(k_len: int, q_offset: int) -> AttentionMask:
            docs = doc_ids[:, :k_len] if doc_ids is not None else None
            if prefix_lm:
                return AttentionMask("prefix", doc_ids=docs, prefix_len=prefix_len, q_offset=q_offset)
            return AttentionMask("causal", doc_ids=docs, q_offset=q_offset)

        hidden = model(ids, make_mask(longest, 0), positions=positions, cache=cache)
        logits = model.head(hidden[:, -1]).float()
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        real_len = torch.tensor(lengths, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
            done = finished.tolist()
            for b, tok in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(tok)
            if eos_id is not None:
                finished |= nxt == eos_id
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            # Finished rows keep decoding (their tokens are dropped) so the batch keeps one shape.
            start = cache.length
            pos = (real_len + step)[:, None] if padded else None
            hidden = model(nxt[:, None], make_mask(start + 1, start), positions=pos, cache=cache)
            logits = model.head(hidden[:, -1]).float()
    finally:
        model.train(was_training)
    return out


def generate_text(model: DualTransformer, tokenizer: Any, prompts: list[str], **kw: Any) -> list[str]:
    """Encode ``prompts`` (with <s>), :func:`generate`, and return the decoded continuations only.

    ``eos_id`` defaults to the tokenizer's eos; other keywords go to :func:`generate`. The continuation is the
    decoded prompt+continuation minus the decoded prompt where that is a prefix (keeps the leading space that
    decoding the new tokens alone would strip), else the new tokens decoded alone.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text takes a list of prompt strings, not a single string")
    kw.setdefault("eos_id", getattr(tokenizer, "eos_id", None))
    prompt_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    new = generate(model, prompt_ids, **kw)
    texts = []
    for p, n in zip(prompt_ids, new, strict=True):
        full = tokenizer.decode(p + n, skip_special=True)
        head = tokenizer.decode(p, skip_special=True)
        texts.append(full[len(head):] if full.startswith(head) else tokenizer.decode(n, skip_special=True))
    return texts
