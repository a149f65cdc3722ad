"""The scorer against direct computations: causal by hand, prefix against an explicit dense mask, MNTP against a
direct masked forward; batching, cache reuse and truncation change nothing."""

import pytest

from megatron_dual.eval.scoring import Scorer, fit_window
from megatron_dual.model import AttentionMask

MASK = 4
# two questions sharing contexts (choices of different lengths), one with a context of its own, one single token
REQUESTS = [
    ([1, 5, 9, 20, 7], [11, 12]),
    ([1, 5, 9, 20, 7], [13]),
    ([1, 5, 9, 20, 7], [14, 15, 16, 17]),
    ([1, 30, 6], [8, 8, 21]),
    ([1, 30, 6], [22]),
    ([1, 25, 26, 27, 28, 29, 10, 6], [18, 19, 23]),
    ([1], [24]),
]


def test_causal_scores_equal_hand_computation(model, reference):
    scores = Scorer(model, MASK, batch_tokens=64).score(REQUESTS, "causal")
    for (ctx, cont), s in zip(REQUESTS, scores, strict=True):
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(reference.causal(ctx, cont), abs=1e-4)


def test_greedy_flag_is_the_argmax_check(model):
    import torch

    ctx = [1, 5, 9]
    with torch.no_grad():
        best = int(model.logits(torch.tensor([ctx]), AttentionMask("causal"))[0, -1].argmax())
    other = (best + 1) % model.cfg.vocab_size
    s_best, s_other = Scorer(model, MASK).score([(ctx, [best]), (ctx, [other])], "causal")
    assert s_best.greedy and not s_other.greedy


def test_prefix_equals_an_explicit_dense_mask(model, reference):
    scorer = Scorer(model, MASK, batch_tokens=64)
    got = scorer.score(REQUESTS, "prefix")
    causal = scorer.score(REQUESTS, "causal")
    assert any(abs(g.logprob - c.logprob) > 1e-3 for g, c in zip(got, causal, strict=True))  # the mask matters
    for (ctx, cont), s in zip(REQUESTS, got, strict=True):
        assert s.logprob == pytest.approx(reference.prefix(ctx, cont), abs=1e-4)


@pytest.mark.parametrize("scheme", ["rest", "single"])
def test_mntp_equals_direct_masked_forward(model, reference, scheme):
    scores = Scorer(model, MASK, batch_tokens=40, mntp_mask=scheme).score(REQUESTS, "mntp")
    for (ctx, cont), s in zip(REQUESTS, scores, strict=True):
        assert s.n_tokens == len(cont)
        assert s.logprob == pytest.approx(reference.mntp(ctx, cont, scheme), abs=1e-4)


def test_mntp_schemes_differ_for_multi_token_continuations(model):
    rest = Scorer(model, MASK, mntp_mask="rest").score(REQUESTS, "mntp")
    single = Scorer(model, MASK, mntp_mask="single").score(REQUESTS, "mntp")
    # the last continuation token has the same copy under both schemes: one-token continuations agree
    for (_, cont), r, s in zip(REQUESTS, rest, single, strict=True):
        if len(cont) == 1:
            assert r.logprob == pytest.approx(s.logprob, abs=1e-5)
    assert abs(rest[2].logprob - single[2].logprob) > 1e-3


@pytest.mark.parametrize("mode", ["causal", "prefix", "mntp"])
def test_batching_does_not_change_scores(model, mode):
    one = Scorer(model, MASK, batch_tokens=1).score(REQUESTS, mode)  # every unit alone
    many = Scorer(model, MASK, batch_tokens=10_000).score(REQUESTS, mode)  # all in one padded batch
    shuffled_order = [6, 2, 0, 5, 1, 4, 3]
    shuffled = Scorer(model, MASK, batch_tokens=50).score([REQUESTS[i] for i in shuffled_order], mode)
    for a, b in zip(one, many, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4) and a.greedy == b.greedy
    for i, s in zip(shuffled_order, shuffled, strict=True):
        assert s.logprob == pytest.approx(one[i].logprob, abs=1e-4)


def test_progress_counts_every_request(model):
    for mode in ("causal", "mntp"):
        seen = []
        Scorer(model, MASK, batch_tokens=30).score(REQUESTS, mode, progress=seen.append)
        assert len(seen) > 1 and sum(seen) == pytest.approx(len(REQUESTS))


def test_long_requests_are_cut_from_the_left(model, reference):
    limit = model.cfg.max_seq_len
    ctx = [1] + [5 + i % 20 for i in range(limit + 10)]
    cont = [7, 8, 9]
    fctx, fcont = fit_window(ctx, cont, limit + 1)  # causal: the last token is a target only, not an input
    assert fcont == cont and fctx == ctx[-(limit + 1 - 3) :] and len(fctx) + len(fcont) == limit + 1
    s = Scorer(model, MASK).score([(ctx, cont)], "causal")[0]
    assert s.logprob == pytest.approx(reference.causal(fctx, fcont), abs=1e-4)
    long_ctx, long_cont = fit_window([1, 2], list(range(5, 5 + limit + 3)), limit)
    assert long_ctx == [2] and len(long_cont) == limit - 1
    with pytest.raises(ValueError, match="non-empty"):
        fit_window([1], [], limit)


def test_a_request_one_longer_than_the_context_loses_no_token(model, reference):
    # causal: max_seq_len + 1 tokens are max_seq_len inputs (the last token is only a target), as in the harness
    limit = model.cfg.max_seq_len
    ctx, cont = [1], [5 + i % 20 for i in range(limit)]
    s = Scorer(model, MASK).score([(ctx, cont)], "causal")[0]
    assert s.n_tokens == limit
    assert s.logprob == pytest.approx(reference.causal(ctx, cont), abs=1e-4)
    # mntp: every token is an input (the masks), so the same request is cut to max_seq_len: one token goes
    m = Scorer(model, MASK).score([(ctx, cont)], "mntp")[0]
    assert m.n_tokens == limit - 1


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="unknown mode 'bidir'; known: causal, prefix, mntp"):
        Scorer(model, MASK).score(REQUESTS, "bidir")
    with pytest.raises(ValueError, match="mntp_mask"):
        Scorer(model, MASK, mntp_mask="all")
