"""Exact repetition, blending, purity of the order, resume, disk caches, data.path parsing and index-build scaling."""

import os
import struct
import time

import numpy as np
import pytest

import megatron_dual.data.loader as loader
from megatron_dual.config import Config, ConfigError
from megatron_dual.data.indexed import INDEX_HEADER, IndexedDataset, IndexedDatasetWriter
from megatron_dual.data.loader import (
    BlendedDataset,
    RepeatedPackedDataset,
    build_datasets,
    choose_subset,
    parse_data_path,
)
from megatron_dual.data.sampler import ResumableSampler, split_documents


def _write(prefix: str, n_docs: int, base: int, length=lambda k: 8) -> str:
    """Document k = [1, base+k, base+k, ...]: every token says which document it came from."""
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for k in range(n_docs):
            w.add_document(np.array([1] + [base + k] * (length(k) - 1)))
    return prefix


def _doc_of(tok: np.ndarray, base: int) -> np.ndarray:
    return tok[tok >= base] - base


def _seen(ds, L: int, base: int) -> np.ndarray:
    """How many tokens of each document the inputs (tokens[:L]) of all samples hold."""
    toks = np.concatenate([ds[p]["tokens"][:L] for p in range(len(ds))])
    return np.bincount(_doc_of(toks, base), minlength=1)


@pytest.mark.parametrize("R", [1, 3, 4])
def test_every_subset_document_seen_exactly_R_times(tmp_path, R):
    L, base = 8, 100
    ds = IndexedDataset(_write(str(tmp_path / "a"), 60, base))
    docs = np.arange(60)
    subset = choose_subset(docs, ds.sequence_lengths, unique_tokens=200, seed=3)
    assert subset.size == 25 and ds.sequence_lengths[subset].sum() >= 200  # 25 docs x 8 tokens: the shortest prefix
    rp = RepeatedPackedDataset(ds, subset, L, passes=R, seed=3)
    assert len(rp) == R * 200 // L
    seen = _seen(rp, L, base)
    per_doc = np.zeros(60, dtype=np.int64)
    per_doc[: seen.size] = seen
    assert np.all(per_doc[subset] == R * 7)  # 7 non-BOS tokens per document, R times
    assert per_doc[np.setdiff1d(docs, subset)].sum() == 0  # nothing outside the unique subset
    # a fresh shuffle per pass: samples of pass e cover exactly pass e's documents, in a new order each pass
    orders = [rp.pass_documents(e) for e in range(R)]
    for e in range(R):
        assert sorted(orders[e].tolist()) == subset.tolist()
        block = [rp[p]["tokens"][:L] for p in range(e * 25, (e + 1) * 25)]
        assert sorted(set(_doc_of(np.concatenate(block), base).tolist())) == subset.tolist()
    if R > 1:
        assert not np.array_equal(orders[0], orders[1])


def test_samples_are_packed_with_doc_ids(tmp_path):
    ds = IndexedDataset(_write(str(tmp_path / "a"), 30, 100, length=lambda k: 3 + k % 7))
    rp = RepeatedPackedDataset(ds, np.arange(30), 16, passes=2, seed=0)
    stream = np.concatenate([np.concatenate([ds[int(d)] for d in rp.pass_documents(e)]) for e in range(3)])
    for p in range(len(rp)):
        s = rp.sample_at(p)
        sample = rp[p]
        np.testing.assert_array_equal(sample["tokens"], stream[s * 16 : s * 16 + 17])
        starts = np.flatnonzero(sample["tokens"] == 1)
        expected = np.zeros(17, dtype=np.int64)
        for i in starts[starts > 0]:
            expected[i:] += 1
        np.testing.assert_array_equal(sample["doc_ids"], expected)
    assert sorted(rp.sample_at(p) for p in range(len(rp))) == list(range(len(rp)))  # a permutation


def test_order_is_a_pure_function_of_seed_and_index(tmp_path):
    ds = IndexedDataset(_write(str(tmp_path / "a"), 50, 100, length=lambda k: 2 + k % 11))
    a = RepeatedPackedDataset(ds, np.arange(50), 8, passes=3, seed=7)
    b = RepeatedPackedDataset(IndexedDataset(ds.prefix), np.arange(50), 8, passes=3, seed=7)
    c = RepeatedPackedDataset(ds, np.arange(50), 8, passes=3, seed=8)
    idx = list(range(len(a)))
    fwd = [a[p]["tokens"].tolist() for p in idx]
    assert [b[p]["tokens"].tolist() for p in reversed(idx)] == fwd[::-1]  # access order does not matter
    assert [c[p]["tokens"].tolist() for p in idx] != fwd


def test_blending_proportions_in_every_prefix(tmp_path):
    L = 8
    a = RepeatedPackedDataset(IndexedDataset(_write(str(tmp_path / "a"), 200, 100)), np.arange(200), L, 2, 0)
    b = RepeatedPackedDataset(IndexedDataset(_write(str(tmp_path / "b"), 200, 1000)), np.arange(200), L, 2, 0)
    blend = BlendedDataset([a, b], [0.7, 0.3], size=300)
    which = np.array([blend.source(p)[0] for p in range(300)])
    for n in (10, 37, 100, 299, 300):
        assert abs((which[:n] == 0).sum() - 0.7 * n) <= 1
    assert abs((which == 0).mean() - 0.7) < 0.01
    # each dataset is consumed in its own order, without gaps or repeats
    for d in (0, 1):
        assert [blend.source(p)[1] for p in range(300) if which[p] == d] == list(range((which == d).sum()))
    toks = blend[int(np.flatnonzero(which == 1)[0])]["tokens"]
    assert toks[toks > 1].min() >= 1000  # sample really came from b
    with pytest.raises(ValueError, match="has 400 samples but the blend needs 7000"):
        BlendedDataset([a, b], [0.7, 0.3], size=10_000)


def _corpus(tmp_path, name="a", n=120, base=100):
    return _write(str(tmp_path / name), n, base, length=lambda k: 5 + (k * 7) % 13)


def test_build_datasets_budget_and_R(tmp_path):
    prefix = _corpus(tmp_path)
    ds = IndexedDataset(prefix)
    L, R, budget = 16, 4, 16 * 40
    train, valid, fp, plan = build_datasets(prefix, L, seed=1, valid_fraction=0.1, budget_tokens=budget, repetitions=R)
    tr, va = split_documents(len(ds), 0.1, 1)
    subset = train.documents
    need = (40 + 2) * L  # the dataset's share plus two samples of rounding slack
    assert set(subset.tolist()) <= set(tr.tolist()) and not set(subset.tolist()) & set(va.tolist())
    assert ds.sequence_lengths[subset].sum() >= need / R
    assert plan.passes == [R] and plan.unique_tokens == [train.unique_tokens] and len(train) >= 40
    assert valid is not None and set(valid.documents.tolist()) == set(va.tolist())
    # the same call is the same plan; a different R or seed is a different fingerprint
    assert build_datasets(prefix, L, 1, 0.1, budget, R)[2] == fp
    assert build_datasets(prefix, L, 1, 0.1, budget, 2)[2] != fp
    assert build_datasets(prefix, L, 2, 0.1, budget, R)[2] != fp
    with pytest.raises(ValueError, match="data.repetitions = 1 .* unique ones, but .*training documents hold only"):
        build_datasets(prefix, L, 1, 0.1, 100 * budget, 1)
    # R = 0: every training document, as many passes as the budget needs
    train0, _, _, plan0 = build_datasets(prefix, L, 1, 0.1, budget * 4, 0)
    assert np.array_equal(train0.documents, tr) and len(train0) >= budget * 4 // L and plan0.passes[0] >= 2


def test_blend_from_data_path_and_resume(tmp_path):
    a, b = _corpus(tmp_path, "a", 150, 100), _corpus(tmp_path, "b", 150, 1000)
    L = 8
    train, valid, fp, plan = build_datasets(
        f"0.7 {a} 0.3 {b}", L, seed=0, valid_fraction=0.05, budget_tokens=L * 200, repetitions=2
    )
    assert isinstance(train, BlendedDataset) and len(train) == 200
    assert [round(w, 3) for w in plan.weights] == [0.7, 0.3]
    frac = np.mean([train.source(p)[0] == 0 for p in range(200)])
    assert abs(frac - 0.7) <= 1 / 200
    assert isinstance(valid, BlendedDataset) and len(valid) > 0

    s1 = ResumableSampler(len(train), 0, fp, shuffle=False)
    first = s1.next_indices(37)
    state = s1.state_dict()
    rest = s1.next_indices(50)
    train2, _, fp2, _ = build_datasets(f"0.7 {a} 0.3 {b}", L, 0, 0.05, L * 200, 2)
    s2 = ResumableSampler(len(train2), 0, fp2, shuffle=False)
    s2.load_state_dict(state)
    cont = s2.next_indices(50)
    assert cont == rest and first == list(range(37))
    assert [train2[i]["tokens"].tolist() for i in cont] == [train[i]["tokens"].tolist() for i in rest]
    # resuming on other data (weights swapped) is refused, saying so
    train3, _, fp3, _ = build_datasets(f"0.3 {a} 0.7 {b}", L, 0, 0.05, L * 200, 2)
    with pytest.raises(ValueError, match="different dataset"):
        ResumableSampler(len(train3), 0, fp3, shuffle=False).load_state_dict(state)


def test_parse_data_path(tmp_path):
    a, b = _corpus(tmp_path, "a", 10), _corpus(tmp_path, "b", 10)
    for k in range(3):
        _corpus(tmp_path, f"shard_text_document_{k:03d}", 10)
    assert parse_data_path(a) == [(None, a)]
    assert parse_data_path(f"0.7 {a} 0.3 {b}") == [(0.7, a), (0.3, b)]
    assert parse_data_path(f"{a} {b}") == [(None, a), (None, b)]
    shards = parse_data_path(f"2 {tmp_path}/shard_text_document_*")
    assert [p for _, p in shards] == [str(tmp_path / f"shard_text_document_{k:03d}") for k in range(3)]
    assert all(w == -2 for w, _ in shards)
    for bad, msg in [
        (f"0.7 {a} 0.3", "pairs"),
        (f"{a} 0.3", "mixes weights"),
        (f"0 {a}", "positive"),
        (f"1 {tmp_path}/nope", "nope.idx does not exist"),
        (f"{tmp_path}/zz*", "matches no .idx"),
        ("", "empty"),
    ]:
        with pytest.raises(loader.DataPathError, match=msg):
            parse_data_path(bad)
    # a weighted glob shares its weight by tokens; unweighted entries are weighted by tokens
    train, _, _, plan = build_datasets(f"{tmp_path}/shard_text_document_*", 8, 0, 0.0, 8 * 10, 0)
    assert len(plan.weights) == 3 and abs(sum(plan.weights) - 1) < 1e-9


def test_disk_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "DISK_CACHE_MIN", 1)
    ds = IndexedDataset(_corpus(tmp_path, "a", 40))
    cache = str(tmp_path / "cache")
    a = RepeatedPackedDataset(ds, np.arange(40), 8, passes=2, seed=5, cache_dir=cache)
    want = [a[p]["tokens"].tolist() for p in range(len(a))]
    assert a._cache.built > 0 and any(f.endswith(".npy") for f in os.listdir(cache))
    assert not any(".tmp-" in f for f in os.listdir(cache))
    b = RepeatedPackedDataset(ds, np.arange(40), 8, passes=2, seed=5, cache_dir=cache)
    assert [b[p]["tokens"].tolist() for p in range(len(b))] == want and b._cache.built == 0
    assert isinstance(b.pass_index(0)[1], np.memmap)


def test_config_fields_and_build_data_errors(tmp_path):
    from megatron_dual.data.dataloader import build_data

    a, b = _corpus(tmp_path, "a", 200, 100), _corpus(tmp_path, "b", 200, 1000)
    cfg = Config()
    cfg.preset = "tiny"
    cfg.model.vocab_size = 2048
    cfg.data.seq_len = 16
    cfg.model.max_seq_len = 16
    cfg.train.steps, cfg.train.micro_batch_size, cfg.train.grad_accum = 10, 2, 2
    cfg.data.path = f"0.6 {a} 0.4 {b}"
    cfg.data.repetitions = 2
    bundle = build_data(cfg)
    assert len(bundle.train) == 10 * 2 * 2 and bundle.plan.passes == [2, 2]
    cfg.data.budget_tokens = 100
    with pytest.raises(ConfigError, match="data.budget_tokens = 100 is less than the 640 tokens"):
        build_data(cfg)
    cfg.data.budget_tokens = 0
    cfg.data.repetitions = 1
    cfg.train.steps = 2000
    with pytest.raises(ConfigError, match=r"data.path = .*data.repetitions = 1"):
        build_data(cfg)
    cfg.data.path = f"0.5 {a} x"
    with pytest.raises(ConfigError, match="data.path"):
        build_data(cfg)
    cfg.data.repetitions = -1
    with pytest.raises(ConfigError, match="data.repetitions = -1"):
        cfg.validate()


def test_a_dataset_of_empty_documents_names_data_path_once(tmp_path):
    from megatron_dual.data.dataloader import build_data

    prefix = str(tmp_path / "empty_docs")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(20):
            w.add_document(np.array([], dtype=np.uint16))
    cfg = Config()
    cfg.data.path, cfg.data.seq_len, cfg.model.max_seq_len = prefix, 16, 16
    with pytest.raises(ConfigError) as e:
        build_data(cfg)
    assert str(e.value) == f"data.path = {prefix!r}: the datasets hold no training tokens"


def test_an_idx_that_is_a_directory_is_named_with_data_path(tmp_path):
    from megatron_dual.data.dataloader import build_data

    prefix = str(tmp_path / "corpus_text_document")
    os.mkdir(prefix + ".idx")
    open(prefix + ".bin", "wb").close()
    cfg = Config()
    cfg.data.path, cfg.data.seq_len, cfg.model.max_seq_len = prefix, 16, 16
    with pytest.raises(ConfigError) as e:
        build_data(cfg)
    assert str(e.value) == f"data.path = {prefix!r}: {prefix}.idx is a directory, not an index file"
    with pytest.raises(loader.DataPathError, match=r"corpus_text_document.idx is a directory, not an index file"):
        parse_data_path(f"{tmp_path}/corpus_*")  # a pattern that matches it, too


def test_validation_too_short_for_one_sample_is_said_at_start(tmp_path, capsys):
    from toy import tiny_overrides

    from megatron_dual.config import load_config
    from megatron_dual.data.dataloader import build_data
    from megatron_dual.trainer import Trainer

    prefix = _write(str(tmp_path / "short"), 40, 16, length=lambda k: 10)  # 40 documents of 10 tokens

    def cfg(*extra: str) -> Config:
        return load_config(overrides=tiny_overrides(prefix, tmp_path / "run", *extra))

    short = cfg("data.valid_fraction=0.02")  # one held-out document: 10 tokens, a sample is 17
    assert build_data(short).valid is None
    Trainer(short, quiet=True).fit(max_steps=1)
    said = [line for line in capsys.readouterr().err.splitlines() if "validation" in line]
    assert said == [
        "warning: validation never runs: data.valid_fraction = 0.02 holds out 1 document (10 tokens), fewer than "
        "one sample of data.seq_len + 1 = 17 tokens; raise data.valid_fraction (or set train.eval_interval=0)"
    ]
    from megatron_dual.data.dataloader import validation_off_note

    for fine in (cfg("data.valid_fraction=0.1"), cfg("data.valid_fraction=0.02", "train.eval_interval=0")):
        assert validation_off_note(fine, build_data(fine)) is None  # validation runs / was switched off on purpose


def _synthetic_idx(prefix: str, n_docs: int, mean_len: int) -> int:
    """A Megatron .idx for n_docs documents (lengths mean_len +- 50%) over a sparse .bin: no tokens written."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2, size=n_docs).astype("<i4")
    pointers = np.zeros(n_docs, dtype="<i8")
    np.cumsum(lengths[:-1].astype(np.int64) * 2, out=pointers[1:])
    total = int(lengths.sum(dtype=np.int64))
    with open(prefix + ".idx", "wb") as f:
        f.write(INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", n_docs, n_docs + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n_docs + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(total * 2)
    return total


def test_index_building_scales(tmp_path):
    # 2M documents, 1B tokens (sparse .bin): open + split + subset + fingerprint + first sample in seconds
    prefix = str(tmp_path / "big")
    total = _synthetic_idx(prefix, 2_000_000, 500)
    t0 = time.perf_counter()
    train, _, _, plan = build_datasets(
        prefix,
        2048,
        seed=0,
        valid_fraction=0.001,
        budget_tokens=total // 2,
        repetitions=4,
        cache_dir=str(tmp_path / "cache"),
    )
    sample = train[len(train) - 1]
    dt = time.perf_counter() - t0
    assert sample["tokens"].shape == (2049,) and plan.subset_documents[0] < 2_000_000 // 7
    assert dt < 20, f"index building took {dt:.1f}s"
