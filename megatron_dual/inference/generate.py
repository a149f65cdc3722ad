"""Causal (and prefix-LM) generation with a KV cache, greedy or sampled (temperature, top-k, top-p).

Batches of prompts of different lengths are left-padded: every row is right-aligned at the end of the padded prompt,
pad positions get document id 0 and real tokens document id 1 (the :class:`AttentionMask` document mask keeps pads
and tokens apart), and RoPE positions count from each row's first real token. A row therefore computes exactly
what it would compute alone (up to floating-point summation order); the tests check this against one-by-one
generation and against recomputing the full logits every step.

mode="prefix" (or prefix_lm=True): the prompt is attended bidirectionally (``AttentionMask("prefix",
prefix_len=prompt_len)``) and the continuation causally. The cached decode is exact: a continuation token never
changes the prompt's keys/values, because prompt queries only see prompt keys under the prefix mask. Each decode
step's single query sees every cached key of its row in both modes, so it runs without a dense mask unless pads
must be hidden. Masked-diffusion generation (the third mode) is in :mod:`.diffusion`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer, KVCache

__all__ = ["MODES", "filter_logits", "sample_next", "prompt_lists", "generate", "generate_text", "diffusion_text"]

MODES = ("causal", "prefix")

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


def prompt_lists(prompt_ids: list[list[int]] | torch.Tensor) -> list[list[int]]:
    """Prompts as lists of ints from a list of id lists or a (T,) / (B, T) tensor."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids tensor must be (T,) or (B, T), got shape {tuple(prompt_ids.shape)}")
        return [[int(x) for x in row] for row in prompt_ids.tolist()]
    return [[int(x) for x in p] for p in prompt_ids]


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens} must be >= 0")
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature = {temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p} must be in (0, 1] (1 disables nucleus sampling)")
    if top_k < 0:
        raise ValueError(f"top_k = {top_k} must be >= 0 (0 disables top-k)")


def _check_args(
    model: DualTransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    mode: str,
) -> None:
    if mode not in MODES:
        raise ValueError(f"generate: mode = {mode!r}; allowed: {', '.join(MODES)} (diffusion: diffusion_generate)")
    if not prompts:
        raise ValueError("generate: no prompts given")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty (it needs at least one token, e.g. <s>)")
    _check_sampling(max_new_tokens, temperature, top_p, top_k)
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds "
            f"model.max_seq_len = {cfg.max_seq_len}"
        )
    for i, p in enumerate(prompts):
        bad = [x for x in p if not 0 <= x < cfg.vocab_size]
        if bad:
            raise ValueError(
                f"generate: prompt {i} has token id {bad[0]} outside [0, model.vocab_size = {cfg.vocab_size})"
            )


class _Decoder:
    """Left-padded batch state of one cached decode: ids, document ids, positions, masks per step."""

    def __init__(self, model: DualTransformer, prompts: list[list[int]], max_new_tokens: int, prefix: bool) -> None:
        param = next(model.parameters())
        device = param.device
        self.lengths = [len(p) for p in prompts]
        self.longest = max(self.lengths)
        pads = torch.tensor([self.longest - n for n in self.lengths], device=device)
        self.padded = any(n != self.longest for n in self.lengths)
        self.ids = torch.full((len(prompts), self.longest), _PAD, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            self.ids[b, self.longest - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        total = self.longest + max_new_tokens
        self.cache = KVCache.allocate(model.cfg, len(prompts), total, device, param.dtype)
        self.doc_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        if self.padded:
            self.doc_ids = (torch.arange(total, device=device)[None, :] >= pads[:, None]).long()
            self.positions = (torch.arange(self.longest, device=device)[None, :] - pads[:, None]).clamp(min=0)
        self.prefix_len = torch.full((len(prompts),), self.longest, dtype=torch.long, device=device)
        self.prefix = prefix
        self.real_len = torch.tensor(self.lengths, device=device)

    def prompt_mask(self) -> AttentionMask:
        docs = self.doc_ids[:, : self.longest] if self.doc_ids is not None else None
        if self.prefix:
            return AttentionMask("prefix", doc_ids=docs, prefix_len=self.prefix_len)
        return AttentionMask("causal", doc_ids=docs)

    def step_mask(self) -> AttentionMask:
        """One new query at the end sees every cached key of its row (causal and prefix alike): no dense mask
        unless pads must be hidden."""
        start = self.cache.length
        if self.doc_ids is None:
            return AttentionMask("bidirectional", q_offset=start)
        return AttentionMask("causal", doc_ids=self.doc_ids[:, : start + 1], q_offset=start)

    def step_positions(self, step: int) -> torch.Tensor | None:
        return (self.real_len + step)[:, None] if self.padded else None


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
    mode: str = "causal",
    stop: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Continue every prompt by up to ``max_new_tokens`` tokens; returns the new tokens only, one list per prompt.

    ``mode``: ``causal``, or ``prefix`` (the prompt attended bidirectionally, the continuation causally;
    ``prefix_lm=True`` is the same). A row stops after it produces ``eos_id`` (included in its list) or when
    ``stop(row, new_tokens)`` returns True (stop strings, see :func:`generate_text`). ``temperature=0`` is greedy;
    otherwise tokens are sampled from softmax(logits / temperature) restricted by ``top_k`` and ``top_p``, with
    ``generator`` (on the model's device) for reproducible sampling. ``prompt_ids`` is a list of token-id lists
    (lengths may differ) or a (B, T) / (T,) tensor.
    """
    prompts = prompt_lists(prompt_ids)
    mode = "prefix" if prefix_lm else mode
    _check_args(model, prompts, max_new_tokens, temperature, top_p, top_k, mode)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        dec = _Decoder(model, prompts, max_new_tokens, prefix=mode == "prefix")
        hidden = model(dec.ids, dec.prompt_mask(), positions=dec.positions, cache=dec.cache)
        logits = model.head(hidden[:, -1]).float()
        finished = [False] * len(prompts)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
            for b, tok in enumerate(nxt.tolist()):
                if not finished[b]:
                    out[b].append(tok)
                    finished[b] = tok == eos_id or (stop is not None and stop(b, out[b]))
            if step == max_new_tokens - 1 or all(finished):
                break
            # Finished rows keep decoding (their tokens are dropped) so the batch keeps one shape.
            hidden = model(nxt[:, None], dec.step_mask(), positions=dec.step_positions(step), cache=dec.cache)
            logits = model.head(hidden[:, -1]).float()
    finally:
        model.train(was_training)
    return out


def _continuation(tokenizer: Any, prompt: list[int], new: list[int]) -> str:
    """The decoded prompt+continuation minus the decoded prompt where that is a prefix (keeps the leading space
    that decoding the new tokens alone would strip), else the new tokens decoded alone."""
    full = tokenizer.decode(prompt + new, skip_special=True)
    head = tokenizer.decode(prompt, skip_special=True)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new, skip_special=True)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def generate_text(
    model: DualTransformer, tokenizer: Any, prompts: list[str], stop: list[str] | None = None, **kw: Any
) -> list[str]:
    """Encode ``prompts`` (with <s>), :func:`generate`, and return the decoded continuations only.

    ``stop``: stop strings; a row stops at the first token whose decoded continuation contains one, and its text
    is cut before it. ``eos_id`` defaults to the tokenizer's eos; other keywords go to :func:`generate`.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text takes a list of prompt strings, not a single string")
    kw.setdefault("eos_id", getattr(tokenizer, "eos_id", None))
    prompt_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    stops = [s for s in (stop or []) if s]

    def hit(row: int, new: list[int]) -> bool:
        return _cut_at_stop(_continuation(tokenizer, prompt_ids[row], new), stops)[1]

    new = generate(model, prompt_ids, stop=hit if stops else None, **kw)
    return [_cut_at_stop(_continuation(tokenizer, p, n), stops)[0] for p, n in zip(prompt_ids, new, strict=True)]


def diffusion_text(
    model: DualTransformer, tokenizer: Any, prompts: list[str], cfg: Any, generator: torch.Generator | None = None
) -> list[str]:
    """Encode ``prompts`` (with <s>), fill ``cfg.length`` masks after each by :func:`diffusion_generate`, decode."""
    from megatron_dual.inference.diffusion import diffusion_generate

    if isinstance(prompts, str):
        raise TypeError("diffusion_text takes a list of prompt strings, not a single string")
    prompt_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    new = diffusion_generate(model, prompt_ids, cfg, generator=generator)
    return [_continuation(tokenizer, p, n) for p, n in zip(prompt_ids, new, strict=True)]
