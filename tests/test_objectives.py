from fractions import Fraction

import pytest
import torch

from megatron_dual.config import ConfigError
from megatron_dual.objectives import (
    AR,
    IGNORE,
    MD,
    ObjectiveSchedule,
    ar_batch,
    loss_coefficients,
    masking_generator,
    md_batch,
)

MASK, BOS = 4, 1


def hand_batch():
    # Two documents packed in one sequence of T+1 = 9 tokens; <s> (id 1) starts each document.
    tokens = torch.tensor([[1, 20, 21, 22, 1, 30, 31, 2, 32]])
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    return tokens, doc_ids


def test_ar_labels_shift_and_ignore_boundaries():
    tokens, doc_ids = hand_batch()
    b = ar_batch(tokens, doc_ids)
    assert b.input_ids.tolist() == [[1, 20, 21, 22, 1, 30, 31, 2]]
    # position 3 (last of doc 0) would predict the <s> of doc 1: ignored
    assert b.labels.tolist() == [[20, 21, 22, IGNORE, 30, 31, 2, 32]]
    assert b.weights.tolist() == [[1, 1, 1, 0, 1, 1, 1, 1]]
    assert b.n_tokens == 7 and b.mask.kind == "causal"
    assert b.mask.doc_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_md_masks_only_non_special_and_weights_one_over_t():
    tokens = torch.tensor([[1, 20, 21, 22, 1, 30, 31, 2, 32]] * 64)
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]] * 64)
    g = torch.Generator().manual_seed(0)
    b = md_batch(tokens, doc_ids, g, mask_token_id=MASK, n_special=16, t_min=1e-3)
    special = tokens[:, :-1] < 16
    assert torch.equal(b.input_ids[special], tokens[:, :-1][special])  # specials never masked
    masked_in = b.input_ids == MASK
    assert masked_in.any() and (~masked_in).any()
    # label at i exactly where token i+1 was masked; the token i+1 of the last position is not in the input
    assert torch.equal(b.labels[:, :-1] != IGNORE, masked_in[:, 1:])
    assert torch.equal(b.labels[b.labels != IGNORE], tokens[:, 1:][b.labels != IGNORE])
    # weights are 1/t per sequence: constant along a row where labelled, >= 1
    for row in range(64):
        w = b.weights[row][b.labels[row] != IGNORE]
        if w.numel():
            assert torch.allclose(w, w[0].expand_as(w)) and w[0] >= 1.0
    assert torch.all(b.weights[b.labels == IGNORE] == 0)
    # normaliser: maskable next-token positions (non-special, same document): 20 21 22 | 30 31 32 -> 6 per row
    assert b.n_tokens == 6 * 64
    assert b.mask.kind == "bidirectional"


def test_md_boundary_never_labelled():
    tokens = torch.tensor([[20, 21, 22, 30, 31, 32]])  # documents without <s>: boundary must still be ignored
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        b = md_batch(tokens, doc_ids, g, mask_token_id=MASK, n_special=16, t_min=0.999)  # t ~ 1: all masked
        assert b.labels[0, 2] == IGNORE  # 22 -> 30 crosses documents
        assert b.labels[0].tolist() == [21, 22, IGNORE, 31, 32]
        assert b.n_tokens == 4


def test_md_estimator_is_unbiased_per_token_scale():
    # E[sum_masked (1/t) * c] / n_tokens = c: the MD loss sits on the per-token scale of AR.
    tokens = torch.randint(16, 100, (4000, 17))
    doc_ids = torch.zeros_like(tokens)
    g = torch.Generator().manual_seed(2)
    b = md_batch(tokens, doc_ids, g, mask_token_id=MASK, n_special=16, t_min=1e-3)
    est = b.weights.sum().item() / b.n_tokens
    assert est == pytest.approx(1.0, rel=0.15)


def test_masking_generator_is_pure():
    a = torch.rand(5, generator=masking_generator(1, 3, 4))
    b = torch.rand(5, generator=masking_generator(1, 3, 4))
    c = torch.rand(5, generator=masking_generator(1, 4, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "alpha, ranks, slots", [(0.75, 1, 4), (63 / 64, 16, 4), (0.0, 2, 2), (1.0, 1, 1), (0.5, 4, 1), (1 / 256, 64, 4)]
)
def test_schedule_realises_alpha_every_step_and_rotates(alpha, ranks, slots):
    s = ObjectiveSchedule(alpha, ranks, slots)
    assert s.alpha == Fraction(alpha).limit_denominator(1024)
    seen = {(r, m): set() for r in range(ranks) for m in range(slots)}
    for step in range(ranks * slots):
        objs = [s.objective(r, m, step) for r in range(ranks) for m in range(slots)]
        assert objs.count(AR) == s.n_ar and objs.count(MD) == s.n_md
        for r in range(ranks):
            for m in range(slots):
                seen[(r, m)].add(s.objective(r, m, step))
    if 0 < alpha < 1:  # over S steps every slot has run both objectives
        assert all(v == {AR, MD} for v in seen.values())


def test_schedule_without_rotation_is_fixed():
    s = ObjectiveSchedule(0.75, 1, 4, rotate=False)
    assert all(s.slots(0, step) == [MD, AR, AR, AR] for step in range(5))


def test_unrealisable_alpha_error():
    with pytest.raises(ConfigError) as e:
        ObjectiveSchedule(0.7, 2, 4)
    assert "5/8 = 0.625" in str(e.value) and "6/8 = 0.75" in str(e.value)


def test_loss_coefficients_mixture():
    c = loss_coefficients(0.75, ar_tokens=300, md_tokens=50)
    assert c[AR] == pytest.approx(0.75 / 300) and c[MD] == pytest.approx(0.25 / 50)
    assert loss_coefficients(1.0, 10, 0)[MD] == 0.0
