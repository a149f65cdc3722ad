"""Masked-diffusion generation and infilling: the MNTP shift, LLaDA's schedule, semi-AR blocks, batching, seeds,
errors."""

import pytest
import torch
from toy import randomised, tiny_model_config

from megatron_dual.inference import (
    DiffusionConfig,
    diffusion_generate,
    diffusion_infill,
    fill_mask_ids,
    row_schedule,
    transfer_schedule,
)
from megatron_dual.model import AttentionMask, DualTransformer

MASK = 4


@pytest.fixture(scope="module")
def model() -> DualTransformer:
    return randomised(tiny_model_config())


@torch.no_grad()
def reference_diffusion(model: DualTransformer, prompt: list[int], length: int, steps: int, block: int) -> list[int]:
    """Greedy low-confidence remasking, one unpadded sequence, full logits recomputed at every step, written
    without the library's batching: each masked position j takes argmax of logits[j - 1] over non-special ids."""
    seq = list(prompt) + [MASK] * length
    start = len(prompt)
    per_block = steps // (length // block)
    for lo in range(start, start + length, block):
        n = block
        counts = [n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)]
        for k in counts:
            logits = model.logits(torch.tensor([seq]), AttentionMask("bidirectional"))[0]
            cands = []
            for j in range(lo, lo + block):
                if seq[j] == MASK:
                    row = logits[j - 1].clone()
                    row[:16] = float("-inf")
                    tok = int(row.argmax())
                    cands.append((float(row.softmax(-1)[tok]), -j, j, tok))
            for _, _, j, tok in sorted(cands, reverse=True)[:k]:
                seq[j] = tok
    return seq[start:]


def test_transfer_schedule_is_llada_linear():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(8, 8) == [1] * 8
    assert sum(transfer_schedule(13, 5)) == 13


@pytest.mark.parametrize("length,steps,block", [(8, 8, 8), (12, 6, 4), (6, 2, 6)])
def test_greedy_diffusion_equals_full_recomputation(model, length, steps, block):
    prompt = [1, 20, 33, 41, 17]
    cfg = DiffusionConfig(length=length, steps=steps, block_length=block)
    got = diffusion_generate(model, [prompt], cfg)[0]
    assert got == reference_diffusion(model, prompt, length, steps, block)
    assert len(got) == length and MASK not in got and min(got) >= 16


def test_batched_padded_prompts_equal_one_by_one(model):
    prompts = [[1, 20, 33, 41, 17, 9, 60], [1, 70], [1, 5, 88, 23]]
    cfg = DiffusionConfig(length=8, steps=4, block_length=4)
    alone = [diffusion_generate(model, [p], cfg)[0] for p in prompts]
    assert diffusion_generate(model, prompts, cfg) == alone
    assert len({tuple(a) for a in alone}) == 3


def test_one_mask_one_step_is_fill_mask_at_the_position_before(model):
    prompt = [1, 20, 33, 41]
    cfg = DiffusionConfig(length=1, steps=1)
    got = diffusion_generate(model, [prompt], cfg)[0]
    top = [t for t, _ in fill_mask_ids(model, torch.tensor(prompt + [MASK]), MASK, top_k=20)[0] if t >= 16]
    assert got == [top[0]]


def test_sampling_is_deterministic_under_a_seed(model):
    prompts = [[1, 20, 33], [1, 44]]
    for remasking in ("confidence", "random"):
        cfg = DiffusionConfig(length=10, steps=5, remasking=remasking, temperature=1.0, top_k=40)
        runs = [diffusion_generate(model, prompts, cfg, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
        assert runs[0] == runs[1]
        assert runs[0] != runs[2]


def test_random_remasking_order_differs_from_confidence(model):
    """Greedy tokens, random order: with one token unmasked per step the order changes what later steps see."""
    prompt = [1, 20, 33, 41, 17]
    conf = diffusion_generate(model, [prompt], DiffusionConfig(length=10, steps=10))[0]
    orders = {
        tuple(
            diffusion_generate(
                model,
                [prompt],
                DiffusionConfig(length=10, steps=10, remasking="random"),
                generator=torch.Generator().manual_seed(s),
            )[0]
        )
        for s in range(4)
    }
    assert len(orders | {tuple(conf)}) > 1


def test_errors(model):
    with pytest.raises(ValueError, match=r"prompt length 40 \+ length 10 = 50 exceeds model.max_seq_len = 48"):
        diffusion_generate(model, [[1] * 40], DiffusionConfig(length=10, steps=10))
    with pytest.raises(ValueError, match="steps = 1 are fewer than the 2 blocks of 8 masks"):
        diffusion_generate(model, [[1]], DiffusionConfig(length=8, steps=1, block_length=4))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        diffusion_generate(model, [[1], []], DiffusionConfig(length=4, steps=4))
    with pytest.raises(ValueError, match="remasking = 'entropy'"):
        diffusion_generate(model, [[1]], DiffusionConfig(length=4, steps=4, remasking="entropy"))
    with pytest.raises(ValueError, match="block_length = -1 must be >= 0"):
        diffusion_generate(model, [[1]], DiffusionConfig(length=4, block_length=-1))
    with pytest.raises(ValueError, match="temperature = nan"):
        diffusion_generate(model, [[1]], DiffusionConfig(length=4, temperature=float("nan")))
    for bad in (dict(top_p=1.5), dict(top_p=0.0), dict(top_k=-1)):  # refused at temperature 0 as well
        with pytest.raises(ValueError, match="top_p = .* must be in"):
            diffusion_generate(model, [[1]], DiffusionConfig(length=4, **bad))


# infilling: the prompt's own masks (several spans, anywhere after position 0), optionally plus an appended span


@torch.no_grad()
def reference_infill(model: DualTransformer, seq: list[int], steps: int, block: int) -> list[int]:
    """Greedy low-confidence remasking over every mask of one unpadded sequence, full logits recomputed at every
    step: blocks of ``block`` masks in order (the last may be shorter), ``steps`` (0: one per mask) split over the
    blocks with the remainder on the first ones, LLaDA's counts inside each block."""
    seq = list(seq)
    fills = [j for j, t in enumerate(seq) if t == MASK]
    block = block or len(fills)
    blocks = [fills[i : i + block] for i in range(0, len(fills), block)]
    steps = steps or len(fills)
    for b, positions in enumerate(blocks):
        s = steps // len(blocks) + (1 if b < steps % len(blocks) else 0)
        for step in range(s):
            k = len(positions) // s + (1 if step < len(positions) % s else 0)
            logits = model.logits(torch.tensor([seq]), AttentionMask("bidirectional"))[0]
            cands = []
            for j in positions:
                if seq[j] == MASK:
                    row = logits[j - 1].clone()
                    row[:16] = float("-inf")
                    tok = int(row.argmax())
                    cands.append((float(row.softmax(-1)[tok]), -j, j, tok))
            for _, _, j, tok in sorted(cands, reverse=True)[:k]:
                seq[j] = tok
    return seq


M = MASK
INFILL_PROMPT = [1, 20, M, M, 41, 17, M, 33, M, M, M, 60]  # three spans: 2, 1, 3 masks


def test_row_schedule():
    assert row_schedule(6, DiffusionConfig()) == [(0, 6, 1)] * 6
    assert row_schedule(7, DiffusionConfig(steps=4, block_length=3)) == [(0, 3, 2), (0, 3, 1), (3, 6, 3), (6, 7, 1)]
    # more steps than masks: the block is full after 2 steps, the steps that would unmask nothing are skipped
    assert row_schedule(2, DiffusionConfig(steps=5)) == [(0, 2, 1), (0, 2, 1)]


@pytest.mark.parametrize(
    "length,steps,block",
    [(0, 0, 0), (0, 3, 0), (0, 4, 4), (5, 0, 4), (4, 5, 3), (3, 20, 0)],
)
def test_greedy_infill_equals_full_recomputation(model, length, steps, block):
    cfg = DiffusionConfig(length=length, steps=steps, block_length=block)
    got = diffusion_infill(model, [INFILL_PROMPT], cfg)[0]
    assert got == reference_infill(model, INFILL_PROMPT + [MASK] * length, steps, block)
    assert len(got) == len(INFILL_PROMPT) + length and MASK not in got
    # only the masks change: every other token comes back as it was, every filled one is non-special
    assert all(g == p for g, p in zip(got, INFILL_PROMPT, strict=False) if p != MASK)
    assert all(g >= 16 for g, p in zip(got, INFILL_PROMPT + [MASK] * length, strict=True) if p == MASK)
    assert diffusion_generate(model, [INFILL_PROMPT], cfg)[0] == got[len(INFILL_PROMPT) :]


def test_infill_batch_with_different_mask_counts_equals_rows_one_by_one(model):
    prompts = [INFILL_PROMPT, [1, M, 70], [1, 5, M, M, 23, M, M, M, M, 9], [1, 30, 31, 32]]
    for cfg in (DiffusionConfig(length=3), DiffusionConfig(length=2, steps=4, block_length=3)):
        alone = [diffusion_infill(model, [p], cfg)[0] for p in prompts]
        assert diffusion_infill(model, prompts, cfg) == alone
    cfg = DiffusionConfig(block_length=2)  # no appended span: the last row has no mask and is left out
    assert diffusion_infill(model, prompts[:3], cfg) == [diffusion_infill(model, [p], cfg)[0] for p in prompts[:3]]


def test_one_step_infill_is_fill_mask_argmax(model):
    """fill-mask reads every mask in one forward: diffusion with one greedy step picks the same tokens."""
    got = diffusion_infill(model, [INFILL_PROMPT], DiffusionConfig(steps=1))[0]
    preds = fill_mask_ids(model, torch.tensor(INFILL_PROMPT), MASK, top_k=40)
    best = [next(t for t, _ in cands if t >= 16) for cands in preds]
    assert [got[j] for j, t in enumerate(INFILL_PROMPT) if t == MASK] == best
    # iterative: later masks see the tokens already filled, so (here) the result differs
    assert diffusion_infill(model, [INFILL_PROMPT], DiffusionConfig())[0] != got


def test_infill_sampling_is_deterministic_under_a_seed(model):
    prompts = [INFILL_PROMPT, [1, M, 70, M]]
    for remasking in ("confidence", "random"):
        cfg = DiffusionConfig(length=2, remasking=remasking, temperature=1.0, top_p=0.9)
        runs = [diffusion_infill(model, prompts, cfg, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
        assert runs[0] == runs[1] and runs[0] != runs[2]
        for out, p in zip(runs[2], prompts, strict=True):
            assert all(o == t for o, t in zip(out, p, strict=False) if t != MASK) and MASK not in out


def test_infill_errors(model):
    with pytest.raises(ValueError, match=r"prompt 1 starts with <mask> \(id 4\): a mask at position 0 cannot be"):
        diffusion_infill(model, [[1, M], [M, 20, M]], DiffusionConfig())
    with pytest.raises(ValueError, match=r"prompt 0 has no <mask> \(id 4\) and length = 0: nothing to fill"):
        diffusion_infill(model, [[1, 20], [1, M]], DiffusionConfig())
    with pytest.raises(ValueError, match="steps = 2 are fewer than the 3 blocks of 6 masks"):
        diffusion_infill(model, [INFILL_PROMPT], DiffusionConfig(steps=2, block_length=2))
