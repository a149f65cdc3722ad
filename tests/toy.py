"""Toy data, the tiny trainer configs and the tiny random models shared by the tests."""

import numpy as np
import torch

from megatron_dual.config import ModelConfig
from megatron_dual.data.indexed import IndexedDatasetWriter
from megatron_dual.model import DualTransformer

VOCAB = 64


def write_structured_corpus(prefix: str) -> str:
    """~120 documents of 10-60 tokens: <s> then ids in [16, VOCAB) with some structure to learn."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(120):
            n = int(rng.integers(10, 60))
            start = int(rng.integers(16, VOCAB))
            w.add_document([1] + [16 + (start - 16 + 3 * i) % (VOCAB - 16) for i in range(n)])
    return prefix


def write_random_corpus(prefix: str, n_docs: int = 80, seed: int = 1) -> str:
    """``n_docs`` documents of 8-40 random ids in [16, VOCAB), each after <s>."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(n_docs):
            n = int(rng.integers(8, 40))
            w.add_document([1] + rng.integers(16, VOCAB, n).tolist())
    return prefix


def toy_model(corpus: str, out, *, n_layers: int = 2, n_heads: int = 2, max_seq_len: int = 32) -> list[str]:
    """The toy runs' output, data and model overrides: 16-token samples of ``corpus`` (a tenth held out), a model
    ``n_layers`` deep and 32 wide with ``n_heads`` heads, an MLP of 48 and the toy vocabulary."""
    return [
        f"output_dir={out}",
        f"data.path={corpus}",
        "data.seq_len=16",
        "data.valid_fraction=0.1",
        f"model.n_layers={n_layers}",
        "model.hidden_size=32",
        f"model.n_heads={n_heads}",
        "model.intermediate_size=48",
        f"model.vocab_size={VOCAB}",
        f"model.max_seq_len={max_seq_len}",
    ]


def tiny_overrides(corpus: str, out, *extra: str) -> list[str]:
    """A 2-layer model on ``corpus``: 6 steps of 4 slots (alpha 3/4), evaluation and checkpoints every 3 steps."""
    return [
        *toy_model(corpus, out),
        "train.micro_batch_size=2",
        "train.grad_accum=4",
        "objective.alpha=3/4",
        "train.steps=6",
        "schedule.decay_steps=2",
        "train.eval_interval=3",
        "train.eval_batches=2",
        "checkpoint.interval=3",
        "checkpoint.keep_last=5",
        "logging.plot=false",
        *extra,
    ]


def tiny_model_config(**kw) -> ModelConfig:
    """A 2-layer model 32 wide with 4 query and 2 key/value heads, 97 ids, 48 positions, plain PyTorch ops and SDPA;
    ``kw`` overrides any field."""
    base = dict(
        n_layers=2,
        hidden_size=32,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=40,
        vocab_size=97,
        max_seq_len=48,
        rope_theta=10_000.0,
        fused_ops="none",
        attention_backend="sdpa",
    )
    base.update(kw)
    return ModelConfig(**base)


def randomised(
    cfg: ModelConfig, seed: int = 0, *, spread: float = 0.1, gain: float = 1.5, unit_embedding: bool = False
) -> DualTransformer:
    """``cfg``'s model with random weights on every path (the reference init zeroes the out/down projections and the
    head bias), in eval mode: norms ~ N(1, spread), other vectors ~ N(0, spread), matrices ~ N(0, gain^2 / fan_in)
    and, with ``unit_embedding``, the embedding ~ N(0, 1), so that tokens, positions and masks visibly change the
    logits."""
    torch.manual_seed(seed)
    model = DualTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, spread)
            elif p.dim() == 1:
                p.normal_(0.0, spread)
            elif unit_embedding and name == "embed.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, gain / p.shape[1] ** 0.5)
    return model.eval()
