import json
import math
from pathlib import Path

import pytest
import torch
import toy
from safetensors.torch import save_file

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.inference import (
    encode_with_masks,
    fill_mask,
    fill_mask_ids,
    filter_logits,
    generate,
    generate_text,
    load_model,
    mask_distributions,
)
from megatron_dual.inference import loading as loading_mod
from megatron_dual.model import AttentionMask, DualTransformer

LTG_TOKENIZER = Path(__file__).resolve().parents[2] / "megatron_dual/assets/ltg-tokenizer/tokenizer.json"


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        n_layers=2, hidden_size=32, n_heads=4, intermediate_size=40, vocab_size=97, max_seq_len=64, rope_theta=10_000.0
    )
    base.update(kw)
    return ModelConfig(**base)


def randomised(cfg: ModelConfig, seed: int = 0) -> DualTransformer:
    return toy.randomised(cfg, seed, unit_embedding=True)


@pytest.fixture(scope="module")
def model() -> DualTransformer:
    return randomised(tiny_cfg())


class FakeTokenizer:
    """Word-level stand-in for megatron_dual.data.tokenizer.Tokenizer (same interface)."""

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]

    def __init__(self, words: list[str]) -> None:
        self.itos = self.specials + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.mask_id = range(5)
        self.vocab_size = len(self.itos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return " ".join(self.itos[i] for i in ids if not (skip_special and i < len(self.specials)))

    def token_to_id(self, tok: str) -> int | None:
        return self.stoi.get(tok)


class HFTokenizerAdapter:
    """The vendored ltg tokenizer.json through `tokenizers` directly, with the project's Tokenizer interface."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.bos_id, self.eos_id, self.mask_id = (self.tok.token_to_id(t) for t in ("<s>", "</s>", "<mask>"))
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)


def greedy_reference(model: DualTransformer, prompt: list[int], n: int, prefix_lm: bool = False) -> list[int]:
    """Recompute the full logits of the whole sequence at every step (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        ids = torch.tensor([seq])
        if prefix_lm:
            mask = AttentionMask("prefix", prefix_len=torch.tensor([len(prompt)]))
        else:
            mask = AttentionMask("causal")
        seq.append(int(model.logits(ids, mask)[0, -1].argmax()))
    return seq[len(prompt) :]


# ---------------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_kv_cache_greedy_equals_full_recompute(n_kv_heads):
    m = randomised(tiny_cfg(n_kv_heads=n_kv_heads), seed=1)
    prompt = [1, 5, 9, 20, 33]
    ref = greedy_reference(m, prompt, 16)
    assert len(set(ref)) > 1  # a non-trivial continuation
    assert generate(m, [prompt], 16, temperature=0) == [ref]
    assert generate(m, torch.tensor(prompt), 16, temperature=0) == [ref]  # 1-D tensor prompt


def test_batched_prompts_of_different_lengths_equal_one_by_one(model):
    prompts = [[1, 7, 8], [1, 40, 41, 42, 43, 44, 45], [1], [1, 90, 3, 11]]
    for prefix_lm in (False, True):
        alone = [generate(model, [p], 10, temperature=0, prefix_lm=prefix_lm)[0] for p in prompts]
        batched = generate(model, prompts, 10, temperature=0, prefix_lm=prefix_lm)
        assert batched == alone
        assert alone == [greedy_reference(model, p, 10, prefix_lm=prefix_lm) for p in prompts]


def test_prefix_lm_cached_decode_equals_dense_prefix_recompute(model):
    prompt = [1, 12, 50, 7, 66, 3]
    ids = torch.tensor([prompt])
    causal = model.logits(ids, AttentionMask("causal"))
    prefix = model.logits(ids, AttentionMask("prefix", prefix_len=torch.tensor([len(prompt)])))
    assert not torch.allclose(causal[0, -1], prefix[0, -1], atol=1e-3)  # the prefix mask changes the prediction
    out = generate(model, [prompt], 14, temperature=0, prefix_lm=True)[0]
    assert out == greedy_reference(model, prompt, 14, prefix_lm=True)
    assert out != generate(model, [prompt], 14, temperature=0)[0]


def test_eos_stops_each_row_independently(model):
    prompts = [[1, 7, 8], [1, 40, 41, 42, 43]]
    free = generate(model, prompts, 12, temperature=0)
    eos = free[0][4]  # row 0 must stop at its step 4 (or earlier, if that token appeared before)

    def cut(seq):
        return seq[: seq.index(eos) + 1] if eos in seq else seq

    stopped = generate(model, prompts, 12, temperature=0, eos_id=eos)
    assert stopped == [cut(s) for s in free]
    assert stopped[0][-1] == eos and len(stopped[0]) <= 5


def test_filter_logits_top_k_and_top_p_sets():
    probs = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])  # order: 1, 3, 0, then 2/4
    logits = probs.log()[None]

    def kept(**kw):
        return set(torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist())

    assert kept() == {0, 1, 2, 3, 4}
    assert kept(top_k=1) == {1}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3) == {0, 1, 3}
    assert kept(top_k=99) == {0, 1, 2, 3, 4}
    assert kept(top_p=0.3) == {1}  # the top token alone reaches 0.3
    assert kept(top_p=0.5) == {1}
    assert kept(top_p=0.6) == {1, 3}
    assert kept(top_p=0.75) == {1, 3}  # 0.5 + 0.25 reaches 0.75 exactly
    assert kept(top_p=0.8) == {0, 1, 3}
    assert kept(top_p=1e-9) == {1}  # the most probable token always survives
    assert kept(top_k=2, top_p=0.6) == {1}  # top-p sees the renormalised top-2: 0.5/0.75 >= 0.6
    assert kept(top_k=2, top_p=0.7) == {1, 3}
    assert kept(top_k=3, top_p=0.8) == {1, 3}  # top-p on the renormalised top-3: 0.5/0.875 + 0.25/0.875 >= 0.8
    # batched rows are filtered independently
    two = torch.stack([logits[0], logits[0].flip(0)])
    out = filter_logits(two, top_k=1)
    assert torch.isfinite(out).sum(1).tolist() == [1, 1] and out[1].argmax() == 3
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=-1)


def test_sampling_respects_top_k_and_is_seeded(model):
    prompts = [[1, 5, 6], [1, 70]]

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 20, temperature=1.0, generator=g, **kw)

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(3, top_p=0.9, top_k=5) == run(3, top_p=0.9, top_k=5)
    # top_k=1 sampling is greedy whatever the seed and temperature
    g = torch.Generator().manual_seed(5)
    assert generate(model, prompts, 8, temperature=2.0, top_k=1, generator=g) == generate(
        model, prompts, 8, temperature=0
    )


def test_generate_validation_errors(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 4)
    with pytest.raises(ValueError, match=r"60.*10.*64"):
        generate(model, [[1] * 60], 10)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            generate(model, [[1]], 4, temperature=bad)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="top_p"):
            generate(model, [[1]], 4, top_p=bad)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 97]], 4)
    assert generate(model, [[1], [1, 2]], 0) == [[], []]
    assert len(generate(model, [[1] * 54], 10, temperature=0)[0]) == 10  # exactly max_seq_len is fine


def test_generate_text_returns_decoded_continuations():
    tok = FakeTokenizer([f"w{i}" for i in range(92)])
    m = randomised(tiny_cfg(vocab_size=tok.vocab_size), seed=3)
    texts = generate_text(m, tok, ["w1 w2 w3", "w10"], max_new_tokens=6, temperature=0, eos_id=None)
    ids = generate(m, [tok.encode("w1 w2 w3"), tok.encode("w10")], 6, temperature=0)
    expect = [" " + tok.decode(i) if tok.decode(i) else "" for i in ids]
    assert texts == expect


# ---------------------------------------------------------------------------------------------------------------
# fill-mask


def test_fill_mask_reads_the_position_before_the_mask(model):
    mask_id = 4
    ids = torch.tensor([1, 7, mask_id, 9, mask_id, mask_id, 11])
    positions, probs = mask_distributions(model, ids, mask_id)
    assert positions.tolist() == [2, 4, 5]
    logits = model.logits(ids[None], AttentionMask("bidirectional"))[0]
    for row, j in zip(probs, positions.tolist(), strict=True):
        torch.testing.assert_close(row, logits[j - 1].softmax(-1))
        assert not torch.allclose(row, logits[j].softmax(-1), atol=1e-3)  # the mask's own position is not it
    # bidirectional: a token after the mask changes the prediction
    ids2 = ids.clone()
    ids2[-1] = 12
    assert not torch.allclose(mask_distributions(model, ids2, mask_id)[1][0], probs[0], atol=1e-4)
    top = fill_mask_ids(model, ids[None], mask_id, top_k=3)
    assert len(top) == 3 and all(len(r) == 3 for r in top)
    for row, j in zip(top, positions.tolist(), strict=True):
        p = logits[j - 1].softmax(-1)
        assert [t for t, _ in row] == p.topk(3).indices.tolist()
        assert [v for _, v in row] == pytest.approx(p.topk(3).values.tolist(), rel=1e-5)
        assert row[0][1] >= row[1][1] >= row[2][1]


def test_fill_mask_errors(model):
    with pytest.raises(ValueError, match="no mask"):
        fill_mask_ids(model, torch.tensor([1, 5, 6]), 4)
    with pytest.raises(ValueError, match="position 0"):
        fill_mask_ids(model, torch.tensor([4, 5, 6]), 4)
    with pytest.raises(ValueError, match="one sequence"):
        fill_mask_ids(model, torch.tensor([[1, 4], [1, 4]]), 4)
    tok = FakeTokenizer([f"w{i}" for i in range(92)])
    with pytest.raises(ValueError, match="no <mask>"):
        fill_mask(model, tok, "w1 w2 w3")
    with pytest.raises(ValueError, match="position 0"):
        fill_mask(model, tok, "<mask> w1", add_bos=False)


def test_fill_mask_text_with_fake_tokenizer():
    tok = FakeTokenizer([f"w{i}" for i in range(92)])
    m = randomised(tiny_cfg(vocab_size=tok.vocab_size), seed=4)
    assert encode_with_masks(tok, "w1 <mask> w2 <mask><mask> w3") == [1, 6, 4, 7, 4, 4, 8]
    assert encode_with_masks(tok, "<mask> w1") == [1, 4, 6]
    out = fill_mask(m, tok, "w1 w2 <mask> w3 <mask>", top_k=4)
    ids = torch.tensor(tok.encode("w1 w2 <mask> w3 <mask>"))
    ref = fill_mask_ids(m, ids, tok.mask_id, top_k=4)
    assert [[(s, p) for s, p in r] for r in out] == [
        [(tok.decode([i], skip_special=False), p) for i, p in r] for r in ref
    ]
    assert all(math.isclose(sum(p for _, p in r), sum(p for _, p in r2)) for r, r2 in zip(out, ref, strict=True))


@pytest.mark.skipif(not LTG_TOKENIZER.is_file(), reason="vendored ltg tokenizer missing")
def test_encode_with_masks_matches_training_tokenisation_with_ltg_tokenizer():
    tok = HFTokenizerAdapter(LTG_TOKENIZER)
    assert tok.mask_id == 4 and tok.bos_id == 1
    full = tok.encode("The capital of France is Paris")
    # the HF added-token path yields one mask id but stand-alone space tokens around it ...
    naive = tok.encode("The capital of <mask> is Paris")
    assert naive.count(4) == 1 and len(naive) == len(full) + 2
    # ... piecewise encoding reproduces the unmasked sentence with one token replaced by <mask>
    ours = encode_with_masks(tok, "The capital of <mask> is Paris")
    assert len(ours) == len(full) and ours.index(4) == 4
    assert ours[:4] == full[:4] and ours[5:] == full[5:]
    two = encode_with_masks(tok, "The <mask> of <mask> is Paris")
    assert two == [full[0], full[1], 4, full[3], 4, *full[5:]]
    start = encode_with_masks(tok, "<mask> capital of France")
    assert start[:2] == [1, 4] and start[2:] == tok.encode("capital of France", add_bos=False)


# ---------------------------------------------------------------------------------------------------------------
# loading


def _save_checkpoint(dir_: Path, model: DualTransformer, config: dict, step: int) -> Path:
    d = dir_ / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "meta.json").write_text(json.dumps({"step": step, "trainer_state": {}, "config": config}))
    return d


def _tiny_run_config() -> dict:
    cfg = load_config(preset="tiny")
    cfg.model.n_layers, cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.vocab_size = 2, 32, 40, 97
    cfg.model.max_seq_len = cfg.data.seq_len = 64
    cfg.data.tokenizer = "fake-spec"
    return cfg.validate().to_dict()


def test_load_model_from_checkpoint_dir_and_run_root(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loading_mod, "_load_tokenizer", lambda spec, origin: seen.append(spec) or FakeTokenizer([]))
    config = _tiny_run_config()
    old = randomised(tiny_cfg(), seed=10)
    new = randomised(tiny_cfg(), seed=11)
    _save_checkpoint(tmp_path / "run" / "checkpoints", old, config, 100)
    latest = _save_checkpoint(tmp_path / "run" / "checkpoints", new, config, 200)
    (tmp_path / "run" / "checkpoints" / "step_00000300").mkdir()  # incomplete (no meta.json): skipped
    ids = torch.tensor([[1, 5, 9, 2]])
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints", latest):
        m, cfg, tok = load_model(str(where))
        assert not m.training and cfg.model.vocab_size == 97 and isinstance(tok, FakeTokenizer)
        torch.testing.assert_close(m.logits(ids, AttentionMask("causal")), new.logits(ids, AttentionMask("causal")))
    m, _, _ = load_model(str(tmp_path / "run" / "checkpoints" / "step_00000100"), tokenizer="other")
    torch.testing.assert_close(m.logits(ids, AttentionMask("causal")), old.logits(ids, AttentionMask("causal")))
    assert seen == ["fake-spec"] * 3 + ["other"]
    m16, _, _ = load_model(str(latest), dtype=torch.bfloat16)
    assert m16.embed.weight.dtype == torch.bfloat16 and m16.rope.inv_freq.dtype == torch.float32


def test_load_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint found at .*empty"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad" / "step_00000001"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(ValueError, match=r"meta\.json has no 'config'"):
        load_model(str(tmp_path / "bad"))
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(bad))
    config = _tiny_run_config()
    config["data"]["tokenizer"] = ""
    d = _save_checkpoint(tmp_path / "notok", randomised(tiny_cfg()), config, 5)
    with pytest.raises(ValueError, match="no tokenizer"):
        load_model(str(d))
    monkeypatch.setattr(loading_mod, "_load_tokenizer", lambda spec, origin: FakeTokenizer([]))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(str(d), tokenizer="x")
    save_file({"embed.weight": torch.zeros(97, 32)}, str(d / "model.safetensors"))
    with pytest.raises(Exception, match="layers"):  # the mismatch names a missing tensor
        load_model(str(d), tokenizer="x")


def test_load_model_names_a_bad_device(tmp_path, monkeypatch):
    monkeypatch.setattr(loading_mod, "_load_tokenizer", lambda spec, origin: FakeTokenizer([]))
    d = _save_checkpoint(tmp_path / "ckpts", randomised(tiny_cfg()), _tiny_run_config(), 3)
    with pytest.raises(ValueError, match="device 'gpu' cannot be used here"):
        load_model(str(d), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0' cannot be used here"):
            load_model(str(d), device="cuda:0")


def test_with_the_project_tokenizer_module():
    tokmod = pytest.importorskip("megatron_dual.data.tokenizer")
    tok = tokmod.load_tokenizer("ltg")
    assert tok.mask_id == 4 and tok.bos_id == 1
    full = tok.encode("The capital of France is Paris", add_bos=True)
    assert 4 not in tok.encode("The capital of <mask> is Paris")  # literal "<mask>" is text to this tokenizer
    ours = encode_with_masks(tok, "The capital of <mask> is Paris")
    assert ours == full[:4] + [4] + full[5:]
    m = randomised(tiny_cfg(vocab_size=tok.vocab_size, hidden_size=16, n_heads=2), seed=6)
    preds = fill_mask(m, tok, "The capital of <mask> is Paris", top_k=3)
    assert len(preds) == 1 and len(preds[0]) == 3 and all(isinstance(s, str) for s, _ in preds[0])
    texts = generate_text(m, tok, ["The capital of France is", "Hello"], max_new_tokens=5, temperature=0)
    ids = generate(
        m, [tok.encode("The capital of France is"), tok.encode("Hello")], 5, temperature=0, eos_id=tok.eos_id
    )
    for text, new in zip(texts, ids, strict=True):
        assert text.strip() == tok.decode(new, skip_special=True).strip()


def test_load_model_names_a_missing_tokenizer(tmp_path):
    pytest.importorskip("megatron_dual.data.tokenizer")
    d = _save_checkpoint(tmp_path / "ckpts", randomised(tiny_cfg()), _tiny_run_config(), 7)
    with pytest.raises(FileNotFoundError, match="missing-tok.json"):
        load_model(str(d), tokenizer=str(tmp_path / "missing-tok.json"))
    config = _tiny_run_config()
    config["data"]["tokenizer"] = "ltg"  # 51,200 tokens > the model's 97
    d2 = _save_checkpoint(tmp_path / "ckpts2", randomised(tiny_cfg()), config, 8)
    with pytest.raises(ValueError, match="vocab_size = 97"):
        load_model(str(d2))
