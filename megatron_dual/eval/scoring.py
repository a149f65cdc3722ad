"""Log-likelihood of continuations given contexts, in the three ways a dual model can be read.

A request is ``(context_ids, continuation_ids)``; its score is the summed log-probability of the continuation's
tokens, the number of those tokens, and whether every one of them is the model's argmax (lm-eval's ``is_greedy``).

* ``causal``: causal attention over ``context + continuation``; token j is predicted by the hidden state at j - 1.
* ``prefix``: prefix-LM: the context is attended bidirectionally, the continuation causally (the continuation sees
  the whole context, the context never sees the continuation). Same read-out as causal.
* ``mntp``: masked next-token prediction with bidirectional attention. The continuation's token k is scored in a
  copy of the sequence where it is replaced by ``<mask>`` and read, because of MNTP's shift, at the hidden state
  of position j - 1 (j = its position). ``mntp_mask="rest"`` (default) masks tokens k.. of the continuation in copy
  k, so the sum is the left-to-right chain rule log p(c_1 | x) + log p(c_2 | x, c_1) + ... of the masked-diffusion
  model: an exact likelihood of one unmasking order, not an over-confident one. ``"single"`` masks only token k
  (the classic pseudo-log-likelihood of Salazar et al., 2020). One copy per continuation token; copies of all
  requests are batched together.

Reuse of a shared context: in ``causal`` and ``prefix`` mode the context's keys and values do not depend on the
continuation (under the prefix mask the context's queries see only the context), so requests with the same context
(the choices of one question) run the context once, copy its KV cache to one row per choice, and run only the
continuations against it. In ``mntp`` mode nothing can be shared: with bidirectional attention every context
position sees the (masked) continuation, so each copy is its own forward pass; batching the copies is what remains.

Batching: units (a context with its choices, or one MNTP copy) are sorted by length, longest first, and packed
while rows x padded length stays within ``batch_tokens`` (default :func:`default_batch_tokens`). Padding is kept out
of every real token's attention with document ids (pads are document 0) and RoPE positions count from each row's
first real token, so a request scores the same alone or in any batch (up to floating-point summation order).

Truncation: a request whose model input is longer than ``model.max_seq_len`` keeps its continuation and the end of
its context (as the harnesses truncate from the left). In causal and prefix mode the last continuation token is
only a target, so ``max_seq_len + 1`` request tokens fit (lm-evaluation-harness's window); in mntp mode every token
is an input (the masks), so ``max_seq_len`` fit. A continuation that alone fills the window keeps its last tokens
after the last context token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_dual.model.attention import AttentionMask
from megatron_dual.model.transformer import DualTransformer, KVCache

__all__ = ["MODES", "MNTP_MASKS", "Score", "Scorer", "fit_window", "default_batch_tokens"]

MODES = ("causal", "prefix", "mntp")
MNTP_MASKS = ("rest", "single")
_PAD = 0
Request = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Score:
    logprob: float
    n_tokens: int
    greedy: bool


def default_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward: 2,048 on CPU (larger batches only add cache misses and padding there: measured in
    benchmarks/RESULTS.md), 16,384 on an accelerator."""
    return 2048 if torch.device(device).type == "cpu" else 16384


def fit_window(ctx: Sequence[int], cont: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut ``ctx + cont`` to ``max_len`` tokens from the left, keeping at least one context token."""
    if not ctx or not cont:
        raise ValueError("a request needs a non-empty context (at least <s>) and a non-empty continuation")
    ctx, cont = list(ctx), list(cont)
    if len(cont) >= max_len:
        return ctx[-1:], cont[-(max_len - 1) :]
    return ctx[-(max_len - len(cont)) :], cont


def _pack(lengths: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Greedy batches of unit indices: ``lengths[i] = (rows, padded length)``, sorted longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i][1])
    batches: list[list[int]] = []
    rows = 0
    for i in order:
        n, length = lengths[i]
        # the first unit of a batch is the longest, so the padded length of the batch is its length
        if batches and (rows + n) * lengths[batches[-1][0]][1] <= budget:
            batches[-1].append(i)
            rows += n
        else:
            batches.append([i])
            rows = n
    return batches


class Scorer:
    """Scores requests with ``model`` (eval mode, no grad) in one of :data:`MODES`."""

    def __init__(
        self, model: DualTransformer, mask_id: int, batch_tokens: int | None = None, mntp_mask: str = "rest"
    ) -> None:
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if batch_tokens is None:
            batch_tokens = default_batch_tokens(self.device)
        if mntp_mask not in MNTP_MASKS:
            raise ValueError(f"mntp_mask = {mntp_mask!r}; allowed: {', '.join(MNTP_MASKS)}")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens = {batch_tokens} must be >= 1")
        self.model = model
        self.mask_id = mask_id
        self.batch_tokens = batch_tokens
        self.mntp_mask = mntp_mask
        self.max_len = model.cfg.max_seq_len

    @torch.inference_mode()
    def score(
        self, requests: Sequence[Request], mode: str, progress: Callable[[float], None] | None = None
    ) -> list[Score]:
        """One :class:`Score` per request, in order. ``progress(n)`` is called as n more requests complete."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        limit = self.max_len if mode == "mntp" else self.max_len + 1  # causal: the last token is a target only
        fitted = [fit_window(c, k, limit) for c, k in requests]
        was_training = self.model.training
        self.model.eval()
        try:
            if mode == "mntp":
                return self._score_mntp(fitted, progress)
            return self._score_shared(fitted, mode, progress)
        finally:
            self.model.train(was_training)

    # -- causal / prefix ------------------------------------------------------------------------------------------

    def _score_shared(
        self, reqs: list[tuple[list[int], list[int]]], mode: str, progress: Callable[[float], None] | None
    ) -> list[Score]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(reqs):
            groups.setdefault(tuple(ctx), []).append(i)
        units = list(groups.items())
        sizes = [(len(idx), len(ctx) + max(len(reqs[i][1]) for i in idx)) for ctx, idx in units]
        out: list[Score | None] = [None] * len(reqs)
        for batch in _pack(sizes, self.batch_tokens):
            members = [units[u] for u in batch]
            scores = self._shared_batch(
                [list(c) for c, _ in members],
                [[reqs[i][1] for i in idx] for _, idx in members],
                prefix=mode == "prefix",
            )
            for (_, idx), row_scores in zip(members, scores, strict=True):
                for i, s in zip(idx, row_scores, strict=True):
                    out[i] = s
            if progress is not None:
                progress(sum(len(idx) for _, idx in members))
        return out  # type: ignore[return-value]

    def _context_pass(self, ctxs: list[list[int]], prefix: bool) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """Left-padded contexts through the model with a KV cache: last hidden states (B, H), the cache, doc ids."""
        dev = self.device
        lc = max(len(c) for c in ctxs)
        ids = torch.full((len(ctxs), lc), _PAD, dtype=torch.long, device=dev)
        for b, c in enumerate(ctxs):
            ids[b, lc - len(c) :] = torch.tensor(c, dtype=torch.long, device=dev)
        pads = torch.tensor([lc - len(c) for c in ctxs], device=dev)
        docs = (torch.arange(lc, device=dev)[None, :] >= pads[:, None]).long()
        positions = (torch.arange(lc, device=dev)[None, :] - pads[:, None]).clamp(min=0)
        if bool(docs.all()):
            docs_arg = None  # no padding: the fast (mask-free or is_causal) attention path
        else:
            docs_arg = docs
        if prefix:
            plen = torch.full((len(ctxs),), lc, dtype=torch.long, device=dev)
            mask = AttentionMask("prefix", doc_ids=docs_arg, prefix_len=plen)
        else:
            mask = AttentionMask("causal", doc_ids=docs_arg)
        cache = KVCache.allocate(self.model.cfg, len(ctxs), lc, dev, self.dtype)
        hidden = self.model(ids, mask, positions=positions, cache=cache)
        return hidden[:, -1], cache, docs

    def _shared_batch(self, ctxs: list[list[int]], conts: list[list[list[int]]], prefix: bool) -> list[list[Score]]:
        """Contexts once, then every continuation of every context against a copy of its context's cache."""
        dev = self.device
        last, cache, docs = self._context_pass(ctxs, prefix)
        row_ctx = [g for g, cs in enumerate(conts) for _ in cs]
        rows = [c for cs in conts for c in cs]
        lk = max(len(c) for c in rows)
        feats = last[torch.tensor(row_ctx, device=dev)][:, None]  # (R, 1, H): predicts each continuation's token 0
        if lk > 1:
            lc = docs.shape[1]
            sel = torch.tensor(row_ctx, device=dev)
            big = KVCache.allocate(self.model.cfg, len(rows), lc + lk - 1, dev, self.dtype)
            big.k[:, :, :, :lc] = cache.k[:, sel]
            big.v[:, :, :, :lc] = cache.v[:, sel]
            big.length = lc
            inp = torch.full((len(rows), lk - 1), _PAD, dtype=torch.long, device=dev)
            for r, c in enumerate(rows):
                if len(c) > 1:
                    inp[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long, device=dev)
            ctx_len = torch.tensor([len(ctxs[g]) for g in row_ctx], device=dev)
            positions = (ctx_len[:, None] + torch.arange(lk - 1, device=dev)[None, :]).clamp(max=self.max_len - 1)
            all_docs = torch.cat([docs[sel], torch.ones(len(rows), lk - 1, dtype=torch.long, device=dev)], dim=1)
            # continuation queries see every context key and earlier continuation keys: the causal mask, whatever
            # the mode (the prefix mask only differs inside the context). Right pads come after every real token.
            mask = AttentionMask("causal", doc_ids=all_docs, q_offset=lc)
            hidden = self.model(inp, mask, positions=positions, cache=big)
            feats = torch.cat([feats, hidden], dim=1)
        flat = self._read_out(feats, rows)
        out, r = [], 0
        for cs in conts:
            out.append(flat[r : r + len(cs)])
            r += len(cs)
        return out

    def _read_out(self, feats: torch.Tensor, rows: list[list[int]]) -> list[Score]:
        """Scores from hidden states ``feats[r, j]`` that predict ``rows[r][j]`` (the head only on those)."""
        dev = self.device
        r_idx = torch.tensor([r for r, c in enumerate(rows) for _ in c], device=dev)
        j_idx = torch.tensor([j for c in rows for j in range(len(c))], device=dev)
        target = torch.tensor([t for c in rows for t in c], device=dev)
        logp = self.model.head(feats[r_idx, j_idx]).float().log_softmax(dim=-1)
        tok_lp = logp.gather(1, target[:, None])[:, 0]
        hit = logp.argmax(dim=-1) == target
        lp_sum = torch.zeros(len(rows), dtype=torch.float64, device=dev).index_add_(0, r_idx, tok_lp.double())
        misses = torch.zeros(len(rows), dtype=torch.long, device=dev).index_add_(0, r_idx, (~hit).long())
        return [
            Score(float(lp), len(c), int(m) == 0)
            for lp, m, c in zip(lp_sum.tolist(), misses.tolist(), rows, strict=True)
        ]

    # -- mntp -----------------------------------------------------------------------------------------------------

    def _score_mntp(
        self, reqs: list[tuple[list[int], list[int]]], progress: Callable[[float], None] | None
    ) -> list[Score]:
        copies = [(i, k) for i, (_, cont) in enumerate(reqs) for k in range(len(cont))]
        sizes = [(1, len(reqs[i][0]) + len(reqs[i][1])) for i, _ in copies]
        lp = [0.0] * len(reqs)
        misses = [0] * len(reqs)
        for batch in _pack(sizes, self.batch_tokens):
            units = [copies[u] for u in batch]
            tok_lp, hit = self._mntp_batch(reqs, units)
            done = 0.0
            for (i, _), v, h in zip(units, tok_lp, hit, strict=True):
                lp[i] += v
                misses[i] += 0 if h else 1
                done += 1.0 / len(reqs[i][1])
            if progress is not None:
                progress(done)
        return [Score(lp[i], len(reqs[i][1]), misses[i] == 0) for i in range(len(reqs))]

    def _mntp_batch(
        self, reqs: list[tuple[list[int], list[int]]], units: list[tuple[int, int]]
    ) -> tuple[list[float], list[bool]]:
        """Copies (request i, continuation token k): masked, bidirectional, read at the position before."""
        dev = self.device
        length = max(len(reqs[i][0]) + len(reqs[i][1]) for i, _ in units)
        ids = torch.full((len(units), length), _PAD, dtype=torch.long, device=dev)
        docs = torch.zeros((len(units), length), dtype=torch.long, device=dev)
        read_at, targets = [], []
        for r, (i, k) in enumerate(units):
            ctx, cont = reqs[i]
            seq = ctx + cont
            p = len(ctx) + k
            end = len(seq) if self.mntp_mask == "rest" else p + 1
            seq = seq[:p] + [self.mask_id] * (end - p) + seq[end:]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=dev)
            docs[r, : len(seq)] = 1
            read_at.append(p - 1)
            targets.append(cont[k])
        mask = AttentionMask("bidirectional", doc_ids=None if bool(docs.all()) else docs)
        hidden = self.model(ids, mask)
        rows = torch.arange(len(units), device=dev)
        logp = self.model.head(hidden[rows, torch.tensor(read_at, device=dev)]).float().log_softmax(dim=-1)
        target = torch.tensor(targets, device=dev)
        return logp.gather(1, target[:, None])[:, 0].tolist(), (logp.argmax(dim=-1) == target).tolist()
