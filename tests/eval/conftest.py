"""Fixtures for the evaluation tests: a tiny random model, a word-level tokenizer, a tiny checkpoint."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_dual.config import ModelConfig, load_config
from megatron_dual.model import DualTransformer

WORDS = (
    "the cat dog sat ran on a mat log is red blue big small Paris France capital of and yes no "
    "Question: Answer: what where who"
).split()


def tiny_model(vocab_size: int = 40, seed: int = 0, max_seq_len: int = 64) -> DualTransformer:
    """Random weights on every path (the reference init zeroes out/down projections, which would make masks and
    positions invisible)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_layers=2,
        hidden_size=32,
        n_heads=4,
        intermediate_size=40,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        rope_theta=10_000.0,
    )
    model = DualTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            elif name == "embed.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    return model.eval()


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
