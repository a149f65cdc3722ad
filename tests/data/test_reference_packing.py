"""data.packing = reference: the paper's training code packs each document as inputs ``doc[:-1]`` and targets
``doc[1:]`` (ltgoslo/dual-language-models, ``pretraining/dataset.py``, ``Datasetv2.chunk``). The expected arrays are
written by hand from that rule; the concatenated layout of the paper recipe is pinned to what it was before."""

import hashlib
import json

import numpy as np
import pytest
import torch
from toy import toy_model

from megatron_dual.config import ConfigError, load_config
from megatron_dual.data.dataloader import TrainDataLoader, collate, collate_samples
from megatron_dual.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_dual.data.loader import RepeatedPackedDataset, build_datasets
from megatron_dual.data.packing import PackedDataset
from megatron_dual.data.sampler import ResumableSampler
from megatron_dual.engine.checkpoint import CheckpointError
from megatron_dual.model import DualTransformer
from megatron_dual.model.loss import IGNORE
from megatron_dual.objectives import (
    AR,
    MD,
    ObjectiveBatcher,
    ObjectiveSchedule,
    make_objective_batch,
    masking_generator,
)
from megatron_dual.trainer import Trainer

# <s> = 1 starts every document, as preprocess writes them (the reference prepends it when it loads a shard)
DOCS = [
    [1, 20, 21, 22, 23],
    [1, 30],
    [1],  # one token: no input, no target
    [1, 40, 41, 42, 43, 44, 45],
    [1, 50, 51],
]
# the reference's rule by hand, seq_len 4: the input stream 1 20 21 22 | 1 | 1 40 41 42 43 44 | 1 50 (13 positions,
# the last one does not fill a chunk and is dropped), each input's target the next token of its own document
EXPECTED = [
    ([1, 20, 21, 22], [20, 21, 22, 23], [0, 0, 0, 0]),
    ([1, 1, 40, 41], [30, 40, 41, 42], [0, 1, 1, 1]),
    ([42, 43, 44, 1], [43, 44, 45, 50], [0, 0, 0, 1]),
]


def _write(path, docs):
    with IndexedDatasetWriter(str(path), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(str(path))


def test_packed_stream_is_the_references_layout(tmp_path):
    ds = _write(tmp_path / "hand", DOCS)
    packed = PackedDataset(ds, 4, layout="reference")
    assert len(packed) == len(EXPECTED)
    repeated = RepeatedPackedDataset(ds, np.arange(len(DOCS)), 4, 1, seed=0, shuffle=False, layout="reference")
    assert len(repeated) == len(EXPECTED)
    for i, (inputs, targets, doc_ids) in enumerate(EXPECTED):
        for sample in (packed[i], repeated[i]):
            assert sample["tokens"].tolist() == inputs
            assert sample["targets"].tolist() == targets
            assert sample["doc_ids"].tolist() == doc_ids
    # the concatenated layout of the same documents: seq_len + 1 tokens, the final tokens 23, 30, 45 are inputs
    assert PackedDataset(ds, 4)[0]["tokens"].tolist() == [1, 20, 21, 22, 23]
    assert "targets" not in PackedDataset(ds, 4)[0]


def _pairs(sample):
    return list(zip(sample["tokens"].tolist(), sample["targets"].tolist(), strict=True))


def test_repetition_is_exact_per_document(tmp_path):
    # every token unique, so (input, target) pairs name the document and the place
    rng = np.random.default_rng(0)
    docs, nxt = [], 16
    for _ in range(30):
        n = int(rng.integers(1, 12))
        docs.append([1] + list(range(nxt, nxt + n)))
        nxt += n
    ds = _write(tmp_path / "rep", docs)
    R, L = 3, 7
    rp = RepeatedPackedDataset(ds, np.arange(len(docs)), L, R, seed=4, layout="reference")
    positions = sum(len(d) - 1 for d in docs)
    assert rp.unique_tokens == positions and len(rp) == R * positions // L
    seen: dict[tuple[int, int], int] = {}
    for p in range(len(rp)):
        s = rp[p]
        assert s["tokens"].shape == s["targets"].shape == s["doc_ids"].shape == (L,)
        for pair in _pairs(s):
            seen[pair] = seen.get(pair, 0) + 1
    every = {(d[i], d[i + 1]) for d in docs for i in range(len(d) - 1)}
    assert set(seen) <= every  # every target is the next token of its input's document
    short = [pair for pair in every if seen.get(pair, 0) != R]
    assert len(short) == R * positions % L  # only the dropped tail (< one sample) is seen R - 1 times
    assert all(seen.get(pair) == R - 1 for pair in short)


def _hand_batch():
    inputs = torch.tensor([e[0] for e in EXPECTED[1:]])
    targets = torch.tensor([e[1] for e in EXPECTED[1:]])
    doc_ids = torch.tensor([e[2] for e in EXPECTED[1:]])
    return inputs, targets, doc_ids


def test_ar_labels_every_position_with_its_documents_next_token():
    inputs, targets, doc_ids = _hand_batch()
    cfg = load_config(overrides=["objective.recipe=reference"]).objective
    b = make_objective_batch(AR, inputs, doc_ids, cfg, masking_generator(0, 0, 0), targets)
    assert b.input_ids.tolist() == inputs.tolist()
    assert b.labels.tolist() == [[30, 40, 41, 42], [43, 44, 45, 50]]  # 30 and 45: the documents' final tokens
    assert b.weights.eq(1).all() and b.n_tokens == 8
    assert b.mask.kind == "causal" and b.mask.doc_ids.tolist() == doc_ids.tolist()


def test_md_labels_are_the_references_target_mask():
    inputs, targets, doc_ids = _hand_batch()
    cfg = load_config(overrides=["objective.recipe=reference"]).objective
    for seed in range(30):
        b = make_objective_batch(MD, inputs, doc_ids, cfg, masking_generator(seed, 0, 0), targets)
        g = masking_generator(seed, 0, 0)  # the reference's draws in our generator's order: ratios, t, u
        ratios = torch.rand((2, 4), generator=g, dtype=torch.float64)
        t, u = torch.rand(2, generator=g, dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64)
        assert b.n_tokens == 8 and b.mask.kind == "bidirectional"
        for r in range(2):
            row = inputs[r].tolist()
            keyed = sorted((float("inf") if row[i] < 16 else float(ratios[r, i]), i) for i in range(4))
            k = max(1, int(4 * float(t[r]) + float(u[r])))
            masked = set(range(4)) if keyed[k - 1][0] == float("inf") else {i for _, i in keyed[:k]}
            weight = 1.0 / ((1 - 1e-4) * len(masked) / 4 + 1e-4)
            # target_mask = cat(mask[1:], True), over the chunk, documents or not
            labelled = [(i + 1) in masked or i == 3 for i in range(4)]
            assert b.input_ids[r].tolist() == [4 if i in masked else row[i] for i in range(4)]
            assert b.labels[r].tolist() == [targets[r, i].item() if labelled[i] else IGNORE for i in range(4)]
            assert b.weights[r].tolist() == pytest.approx([weight if x else 0.0 for x in labelled], rel=1e-6)


def test_no_attention_across_documents():
    torch.manual_seed(0)
    overrides = ["model.n_layers=2", "model.hidden_size=32", "model.n_heads=2", "model.intermediate_size=48"]
    model = DualTransformer(load_config(overrides=[*overrides, "model.vocab_size=64"]).model).eval()
    cfg = load_config(overrides=["objective.recipe=reference"]).objective
    inputs, targets, doc_ids = _hand_batch()
    other = inputs.clone()
    # special stays special and ordinary stays ordinary, so the MD masks are drawn alike
    other[0, 0] = 2  # row 0, document 0 (one position, a <s>); document 1 is positions 1-3
    other[1, 1] = 50  # row 1, document 0 (positions 0-2); document 1 is position 3
    for objective in (AR, MD):
        outs = []
        for x in (inputs, other):
            b = make_objective_batch(objective, x, doc_ids, cfg, masking_generator(1, 0, 0), targets)
            with torch.no_grad():
                outs.append(model(b.input_ids, b.mask))
        a, c = outs
        torch.testing.assert_close(a[0, 1:], c[0, 1:], rtol=0, atol=0)
        torch.testing.assert_close(a[1, 3:], c[1, 3:], rtol=0, atol=0)
        if objective == AR:  # (MD may have masked the changed position)
            assert not torch.equal(a[0, 0], c[0, 0]) and not torch.equal(a[1, 1:3], c[1, 1:3])


# ------------------------------------------------------------------------------------- config, loader, resume


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("refpack") / "toy_text_document")
    rng = np.random.default_rng(3)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(100):
            w.add_document([1] + rng.integers(16, 64, int(rng.integers(1, 30))).tolist())
    return prefix


def tiny(corpus, out, *extra):
    return load_config(
        overrides=[
            *toy_model(corpus, out, n_layers=1, max_seq_len=16),
            "train.micro_batch_size=2",
            "train.grad_accum=2",
            "train.steps=4",
            "schedule.decay_steps=1",
            "train.eval_interval=2",
            "train.eval_batches=1",
            "checkpoint.interval=2",
            "logging.plot=false",
            "train.threads=1",
            "objective.recipe=reference",
            "objective.alpha=1/2",
            *extra,
        ]
    )


def test_packing_follows_the_recipe_and_is_checked():
    assert load_config(overrides=[]).data.layout("paper") == "concat"
    assert load_config(overrides=["objective.recipe=reference"]).data.layout("reference") == "reference"
    assert load_config(overrides=["objective.recipe=reference", "data.packing=concat"]).data.layout("reference") == (
        "concat"
    )
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(overrides=["data.packing=reference"])  # the paper recipe's MD is defined on the concat stream
    with pytest.raises(ConfigError, match="data.packing"):
        load_config(overrides=["data.packing=shifted"])


def _metrics(path):
    keep = ("step", "loss", "ar_loss", "md_loss", "grad_norm", "val_ar_loss", "val_md_loss", "ar_tokens")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(path))]


def test_resume_is_bit_exact_and_a_layout_change_is_refused(corpus, tmp_path):
    full = Trainer(tiny(corpus, tmp_path / "full"), quiet=True)
    assert full.data.packing == "reference" and full.loader.state_dict()["packing"] == "reference"
    t, d, y = collate_samples(full.data.train, [0])
    assert y is not None and t.shape == y.shape == d.shape == (1, 16)
    full.fit()
    part = Trainer(tiny(corpus, tmp_path / "part"), quiet=True)
    part.fit(max_steps=3)  # last checkpoint: step 2
    torch.manual_seed(999)
    resumed = Trainer(tiny(corpus, tmp_path / "part"), quiet=True)
    resumed.fit()
    a, b = _metrics(tmp_path / "full" / "metrics.jsonl"), _metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b
    for (n, p1), (_, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n
    with pytest.raises(CheckpointError, match="data.packing"):
        Trainer(tiny(corpus, tmp_path / "part", "data.packing=concat"), quiet=True).fit()


def test_loader_state_names_a_changed_layout(corpus):
    schedule = ObjectiveSchedule(1 / 2, 1, 2)
    batcher = ObjectiveBatcher(load_config(overrides=["objective.recipe=reference"]).objective, 0)
    loaders = {}
    for layout in ("concat", "reference"):
        train, _, fp, _ = build_datasets(corpus, 16, 1, 0.1, 800, 1, layout=layout)
        loaders[layout] = TrainDataLoader(train, fp, schedule, batcher, seed=1, micro_batch_size=2)
    assert loaders["concat"].fingerprint != loaders["reference"].fingerprint
    loaders["reference"].batches(0)
    state = loaders["reference"].state_dict()
    with pytest.raises(ValueError, match="data.packing .*'reference' in the checkpoint vs 'concat' now"):
        loaders["concat"].load_state_dict(state)
    old = {k: v for k, v in loaders["concat"].state_dict().items() if k != "packing"}  # a state older than the field
    sampler = ResumableSampler(old["num_samples"], old["seed"], old["fingerprint"], packing="reference")
    with pytest.raises(ValueError, match="data.packing .*'concat' in the checkpoint vs 'reference' now"):
        sampler.load_state_dict(old)
    with pytest.raises(ValueError, match="collate_samples"):
        collate(loaders["reference"].dataset, [0])


def test_paper_packing_is_unchanged(tmp_path):
    """The concatenated layout (the paper recipe and the demo) gives the samples and fingerprint it gave before the
    reference layout existed (digests taken from commit d6f8ff7), so its floats and checkpoints are unchanged."""
    prefix = str(tmp_path / "toy_text_document")
    rng = np.random.default_rng(11)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(40):
            w.add_document([1] + rng.integers(16, 200, int(rng.integers(1, 30))).tolist())
    train, valid, fp, _ = build_datasets(prefix, 8, 5, 0.1, 400, 2)
    assert fp == "9e24e6cf44d6295bf47fa244b2d68fbddd730ec6d944e89a780070cd61a8178d"
    h = hashlib.sha256()
    for ds in (train, valid):
        for i in range(len(ds)):
            s = ds[i]
            assert set(s) == {"tokens", "doc_ids"}
            h.update(s["tokens"].astype("<i8").tobytes())
            h.update(s["doc_ids"].astype("<i8").tobytes())
    assert h.hexdigest() == "5a47eb613181ab1f8a7eba21817fa0083749333df2632953afed0d2b8a283378"
    assert load_config(overrides=[f"data.path={prefix}"]).data.layout("paper") == "concat"
