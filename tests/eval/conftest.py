"""Fixtures for the evaluation tests: a tiny random model, a word-level tokenizer, a tiny checkpoint."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from toy import randomised

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.model import AttentionMask, DualTransformer
from megatron_dual.model import transformer as transformer_mod

WORDS = (
    "the cat dog sat ran on a mat log is red blue big small Paris France capital of and yes no "
    "Question: Answer: what where who"
).split()


def tiny_model(vocab_size: int = 40, seed: int = 0, max_seq_len: int = 64) -> DualTransformer:
    """Random weights on every path (the reference init zeroes out/down projections, which would make masks and
    positions invisible)."""
    cfg = ModelConfig(
        n_layers=2,
        hidden_size=32,
        n_heads=4,
        intermediate_size=40,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        rope_theta=10_000.0,
    )
    return randomised(cfg, seed, unit_embedding=True)


class WordTokenizer:
    """Word-level stand-in with the project's Tokenizer interface (one token per whitespace-separated word)."""

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]

    def __init__(self, words=WORDS) -> None:
        self.itos = self.specials + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.unk_id, self.bos_id, self.eos_id, self.pad_id, self.mask_id = range(5)
        self.vocab_size = len(self.itos)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids, skip_special: bool = True) -> str:
        return " ".join(self.itos[i] for i in ids if not (skip_special and i < len(self.specials)))


@pytest.fixture(scope="session")
def model() -> DualTransformer:
    return tiny_model(vocab_size=len(WordTokenizer().itos))


@pytest.fixture(scope="session")
def tok() -> WordTokenizer:
    return WordTokenizer()


def save_checkpoint(root: Path, model: DualTransformer, tokenizer_spec: str, step: int = 10) -> Path:
    """A checkpoint directory as the trainer writes it (model.safetensors + meta.json with the config)."""
    cfg = load_config(preset="tiny")
    m = model.cfg
    cfg.model.n_layers, cfg.model.hidden_size, cfg.model.n_heads = m.n_layers, m.hidden_size, m.n_heads
    cfg.model.intermediate_size, cfg.model.vocab_size, cfg.model.rope_theta = (
        m.intermediate_size,
        m.vocab_size,
        m.rope_theta,
    )
    cfg.model.max_seq_len = cfg.data.seq_len = m.max_seq_len
    cfg.data.tokenizer = tokenizer_spec
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "meta.json").write_text(json.dumps({"step": step, "trainer_state": {}, "config": cfg.validate().to_dict()}))
    return d


MASK = 4


def direct_logprobs(model, seq, mask) -> torch.Tensor:
    """(T, V) log-probabilities of one unpadded sequence."""
    with torch.no_grad():
        return model.logits(torch.tensor([seq]), mask)[0].log_softmax(-1)


def explicit_attention(allowed_fn):
    """An attention that ignores the AttentionMask it is given and uses the dense boolean matrix
    ``allowed_fn(q_len, k_len)`` (True = may attend)."""

    def attn(q, k, v, mask, backend="sdpa"):
        allowed = allowed_fn(q.shape[-2], k.shape[-2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])

    return attn


class Reference:
    """Direct, one-sequence-at-a-time computations of each mode's score, masks written out by hand."""

    def __init__(self, model: DualTransformer) -> None:
        self.model = model

    def _run(self, seq, allowed_fn) -> torch.Tensor:
        with mock.patch.object(transformer_mod, "attention", explicit_attention(allowed_fn)):
            return direct_logprobs(self.model, seq, AttentionMask("causal"))  # the mask object is ignored

    def causal(self, ctx, cont) -> float:
        seq = ctx + cont
        # the last token is only a target: max_seq_len + 1 tokens are max_seq_len inputs
        lp = self._run(seq[:-1], lambda q, k: torch.arange(k)[None, :] <= torch.arange(q)[:, None])
        return sum(float(lp[j - 1, seq[j]]) for j in range(len(ctx), len(seq)))

    def prefix(self, ctx, cont) -> float:
        seq, n = ctx + cont, len(ctx)

        def allowed(q_len, k_len):
            q, k = torch.arange(q_len)[:, None], torch.arange(k_len)[None, :]
            return (k <= q) | (k < n)  # context keys visible to every query, the rest causal

        lp = self._run(seq, allowed)
        return sum(float(lp[j - 1, seq[j]]) for j in range(n, len(seq)))

    def mntp(self, ctx, cont, scheme: str = "rest") -> float:
        """Each copy its own forward with an all-True mask; read at the position before the masked target."""
        total = 0.0
        for k in range(len(cont)):
            seq = ctx + cont
            p = len(ctx) + k
            masked_until = len(seq) if scheme == "rest" else p + 1
            seq = seq[:p] + [MASK] * (masked_until - p) + seq[masked_until:]
            lp = self._run(seq, lambda q, kk: torch.ones(q, kk, dtype=torch.bool))
            total += float(lp[p - 1, cont[k]])
        return total

    def score(self, ctx, cont, mode: str) -> float:
        return self.mntp(ctx, cont) if mode == "mntp" else getattr(self, mode)(ctx, cont)


@pytest.fixture(scope="session")
def reference(model) -> Reference:
    return Reference(model)


def write_word_tokenizer(path: Path) -> int:
    """A word-level tokenizer.json with the project's 16 special tokens and <s> prepended; returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from megatron_dual.data.tokenizer import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(set(WORDS + ["France", "Berlin", "Germany"])))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIAL_TOKENS)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(path))
    return len(vocab)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A trainer-style checkpoint of a tiny random model whose config names a word-level tokenizer file."""
    root = tmp_path_factory.mktemp("ckpt")
    size = write_word_tokenizer(root / "tokenizer.json")
    return save_checkpoint(
        root / "run" / "checkpoints", tiny_model(vocab_size=size, seed=3), str(root / "tokenizer.json")
    )
