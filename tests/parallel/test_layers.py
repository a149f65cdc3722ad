"""Tensor parallelism on CPU with gloo: TP=4 and TP=2 (x DP=2) equal the single-process model.

One spawned run of 4 processes (TP=4, then TP=2 x DP=2) builds the tiny model with the reference seed on every
rank, shards it with ``parallelize_model`` and runs an AR batch (causal) and an MD batch (bidirectional), both with
document ids, through the model and ``labelled_loss``; this process compares hidden states, the loss sums
and every parameter gradient (gathered back to full with ``gather_state_dict``) with the single-process model.
Cases: plain heads, GQA, sequence parallelism. The vocab-parallel cross-entropy is also checked on its own (z-loss,
weights, ignored labels, argmax ties across shards). The pure parts (sharding, errors, RNG tracker, checkpoint
conversion) run in this process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_dual.config import ConfigError, ModelConfig, OptimizerConfig, load_config
from megatron_dual.model.loss import IGNORE, labelled_loss, reference_loss
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.objectives import ar_batch, md_batch
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.parallel.layers import (
    check_tp_divisibility,
    gather_state_dict,
    shard_state_dict,
    shard_tensor,
    sharding_of,
    unshard_tensor,
)
from megatron_dual.parallel.testing import DistributedTestError, run_distributed

Z = 1e-2  # larger than the recipe's 1e-4 so the z-loss term is visible in the comparison
ATOL, RTOL = 2e-5, 1e-4
MAX_DIFF: dict[str, float] = {}  # largest |TP - single| per quantity, printed at the end (pytest -s)

# (key, gqa, sequence_parallel)
CASES = [("mha", False, False), ("gqa", True, False), ("sp", False, True)]


def _cfg(gqa: bool) -> ModelConfig:
    cfg = ModelConfig(
        n_layers=2,
        hidden_size=32,
        n_heads=8 if gqa else 4,
        n_kv_heads=4 if gqa else None,
        intermediate_size=48,
        vocab_size=64,
        max_seq_len=32,
        attention_backend="sdpa",
        fused_ops="none",
    )
    cfg.validate()
    return cfg


def _model(cfg: ModelConfig) -> DualTransformer:
    """The reference init, then every parameter perturbed (zero-initialised projections would hide gradients)."""
    torch.manual_seed(0)
    model = DualTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.3 * noise)
    return model


def _batches() -> dict:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(16, 64, (2, 17), generator=g)
    tokens[:, 0] = 1
    tokens[0, 9] = 1
    tokens[1, 5] = 1
    doc_ids = (tokens == 1).cumsum(dim=1)
    md = md_batch(tokens, doc_ids, torch.Generator().manual_seed(3), mask_token_id=4, n_special=16, t_min=0.5)
    return {"ar": ar_batch(tokens, doc_ids), "md": md}


def _step(model, batch, loss_fn):
    model.zero_grad(set_to_none=True)
    hidden = model(batch.input_ids, batch.mask)
    sums = loss_fn(model.head, hidden, batch.labels, batch.weights, Z)
    (sums.weighted / max(1, sums.count)).backward()
    return hidden.detach(), sums


def _ce_inputs():
    g = torch.Generator().manual_seed(5)
    logits = 3.0 * torch.randn(12, 64, generator=g)
    logits[0, 5] = logits[0, 40] = 50.0  # a tie across shards: torch.argmax takes 5
    logits[1, 33] = logits[1, 62] = 50.0  # a tie inside the last shards
    labels = torch.randint(0, 64, (12,), generator=g)
    labels[0], labels[1], labels[3], labels[7] = 40, 33, IGNORE, IGNORE
    weights = torch.rand(12, generator=g) + 0.5
    return logits, labels, weights


# ------------------------------------------------------------------------------------------------ worker
def _tp_worker(rank: int, world: int, tps: list[int]) -> dict:
    from megatron_dual.parallel.cross_entropy import vocab_parallel_loss_sums
    from megatron_dual.parallel.layers import ColumnParallelLinear
    from megatron_dual.parallel.mappings import all_gather_along
    from megatron_dual.parallel.state import ParallelState
    from megatron_dual.parallel.tensor_parallel import parallelize_model, sync_sequence_parallel_grads

    out: dict = {}
    for tp in tps:
        par = ParallelState(world, rank, tp=tp)
        group = par.tp_group
        for key, gqa, sp in CASES:
            cfg = _cfg(gqa)
            model = parallelize_model(_model(cfg), group, sequence_parallel=sp)
            expect = shard_state_dict(_model(cfg).state_dict(), par.tp_rank, tp, cfg)
            sd = model.state_dict()
            out[(tp, key, "shards_exact")] = set(sd) == set(expect) and all(torch.equal(sd[k], expect[k]) for k in sd)
            out[(tp, key, "attrs")] = {
                n: (
                    getattr(p, "tensor_parallel_dim", None),
                    getattr(p, "tensor_parallel_splits", None),
                    getattr(p, "sequence_parallel", False),
                )
                for n, p in model.named_parameters()
            }
            ar = _batches()["ar"]
            with torch.no_grad():  # inference path: full logits gathered over the vocabulary (and sequence)
                out[(tp, key, "logits")] = model.logits(ar.input_ids, ar.mask)
            for obj, batch in _batches().items():
                hidden, sums = _step(model, batch, labelled_loss)
                if sp:
                    sync_sequence_parallel_grads(model)
                    hidden = all_gather_along(hidden, group, dim=1)
                out[(tp, key, obj)] = {
                    "hidden": hidden,
                    "weighted": sums.weighted.detach(),
                    "nll": sums.nll,
                    "z": sums.z,
                    "correct": sums.correct,
                    "count": sums.count,
                    "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
                }
            # one optimizer step on the MD gradients: distributed Muon (TP shards gathered, owners over DP) + AdamW
            optimizers = build_optimizers(model, OptimizerConfig(lr=0.02))
            optimizers["muon"].distribute(par)
            for o in optimizers.values():
                o.step()
            out[(tp, key, "params")] = {n: p.detach().clone() for n, p in model.named_parameters()}
        # a column-parallel layer with row blocks and gather_output returns the full layer's output
        full_qkv = _model(_cfg(True)).layers[0].attn.qkv
        layer = ColumnParallelLinear.from_linear(full_qkv, group, splits=[32, 16, 16], gather_output=True)
        x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
        out[(tp, "gather_output")] = (layer(x) - full_qkv(x)).abs().max().item()
        logits, labels, weights = _ce_inputs()
        local = logits.chunk(tp, dim=-1)[par.tp_rank].clone().requires_grad_()
        sums = vocab_parallel_loss_sums(local, labels, weights, Z, group)
        sums.weighted.backward()
        out[(tp, "ce")] = {
            "weighted": sums.weighted.detach(),
            "nll": sums.nll,
            "z": sums.z,
            "correct": sums.correct,
            "count": sums.count,
            "grad": local.grad,
        }
        out[(tp, "tp_rank")] = par.tp_rank
    return out


def _failing_worker(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # blocks for good: run_distributed must terminate this rank
    return rank


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference() -> dict:
    ref = {}
    for key, gqa, _ in CASES:
        model = _model(_cfg(gqa))
        for obj, batch in _batches().items():
            hidden, sums = _step(model, batch, labelled_loss)
            ref[(key, obj)] = {
                "hidden": hidden,
                "weighted": sums.weighted.detach(),
                "nll": sums.nll,
                "z": sums.z,
                "correct": sums.correct,
                "count": sums.count,
                "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            }
        ar = _batches()["ar"]
        with torch.no_grad():
            ref[(key, "logits")] = model.logits(ar.input_ids, ar.mask)
        optimizers = build_optimizers(model, OptimizerConfig(lr=0.02))
        for o in optimizers.values():
            o.step()
        ref[(key, "params")] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return ref


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict]]:
    """world size -> per-rank results: 4 processes run TP=4, then TP=2 x DP=2 (two TP groups of 2).

    One spawn for both layouts: starting interpreters dominates the cost on shared CPUs (the 2-process
    spawn is exercised by ``test_run_distributed_reports_failing_rank``)."""
    return {4: run_distributed(_tp_worker, 4, [4, 2])}


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    kind = name.split(":")[0]
    MAX_DIFF[kind] = max(MAX_DIFF.get(kind, 0.0), diff)
    if got.numel():
        rel = diff / max(want.abs().max().item(), 1e-12)
        MAX_DIFF[kind + "_rel"] = max(MAX_DIFF.get(kind + "_rel", 0.0), rel)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda s: f"{name}: {s}")


LAYOUTS = [(4, 4), (4, 2)]  # (processes, tp)


@pytest.mark.parametrize("world,tp", LAYOUTS, ids=lambda x: str(x))
@pytest.mark.parametrize("key", [c[0] for c in CASES])
def test_tensor_parallel_equals_single_process(runs, reference, world, tp, key):
    results = runs[world]
    cfg = _cfg(dict((c[0], c[1]) for c in CASES)[key])
    for r, res in enumerate(results):
        assert res[(tp, key, "shards_exact")], f"rank {r}: parallelize_model's shards differ from shard_state_dict"
    for r, res in enumerate(results):
        _close(f"logits:{key}/tp{tp}/rank{r}", res[(tp, key, "logits")], reference[(key, "logits")])
        assert res[(tp, "gather_output")] < 1e-5
    for obj in ("ar", "md"):
        want = reference[(key, obj)]
        for r, res in enumerate(results):
            got = res[(tp, key, obj)]
            _close(f"hidden:{key}/{obj}/tp{tp}/rank{r}", got["hidden"], want["hidden"])
            for q in ("weighted", "nll", "z"):
                _close(f"loss:{key}/{obj}/tp{tp}/rank{r}/{q}", got[q], want[q])
            assert got["correct"].item() == want["correct"].item()
            assert got["count"] == want["count"]
        for d in range(world // tp):  # every DP replica's TP group reassembles the full gradients
            shards = [results[d * tp + t][(tp, key, obj)]["grads"] for t in range(tp)]
            assert [results[d * tp + t][(tp, "tp_rank")] for t in range(tp)] == list(range(tp))
            full = gather_state_dict(shards, cfg)
            assert set(full) == set(want["grads"])
            for n, g in want["grads"].items():
                assert full[n].shape == g.shape, n
                _close(f"grad:{key}/{obj}/tp{tp}/{n}", full[n], g)


@pytest.mark.parametrize("world,tp", LAYOUTS, ids=lambda x: str(x))
@pytest.mark.parametrize("key", [c[0] for c in CASES])
def test_optimizer_step_equals_single_process(runs, reference, world, tp, key):
    """Distributed Muon (megatron_dual.optim.muon) reassembles the TP shards through their attributes."""
    results = runs[world]
    cfg = _cfg(dict((c[0], c[1]) for c in CASES)[key])
    for d in range(world // tp):
        full = gather_state_dict([results[d * tp + t][(tp, key, "params")] for t in range(tp)], cfg)
        for n, p in reference[(key, "params")].items():
            _close(f"param:{key}/tp{tp}/{n}", full[n], p)


@pytest.mark.parametrize("world,tp", LAYOUTS, ids=lambda x: str(x))
def test_parameter_attributes(runs, world, tp):
    for key, gqa, sp in CASES:
        cfg = _cfg(gqa)
        attrs = runs[world][0][(tp, key, "attrs")]
        for name, (dim, splits, seq_par) in attrs.items():
            spec = sharding_of(name, cfg)
            assert (dim, splits) == (spec if spec is not None else (None, None)), name
            assert seq_par == (sp and name.startswith("layers.") and "norm" in name), name


@pytest.mark.parametrize("world,tp", LAYOUTS, ids=lambda x: str(x))
def test_vocab_parallel_cross_entropy(runs, world, tp):
    logits, labels, weights = _ce_inputs()
    full = logits.clone().requires_grad_()
    want = reference_loss(full, labels, weights, Z)
    want.backward()
    keep = labels != IGNORE
    lse = torch.logsumexp(logits[keep], dim=-1)
    nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    correct = (logits.argmax(-1) == labels)[keep].sum().item()
    results = runs[world]
    for r, res in enumerate(results):
        got = res[(tp, "ce")]
        _close(f"ce:tp{tp}/rank{r}/weighted", got["weighted"], want)
        _close(f"ce:tp{tp}/rank{r}/nll", got["nll"], (weights[keep] * nll).sum())
        _close(f"ce:tp{tp}/rank{r}/z", got["z"], (weights[keep] * lse.square()).sum())
        assert got["correct"].item() == correct
        assert got["count"] == int(keep.sum())
    grad = torch.cat([results[t][(tp, "ce")]["grad"] for t in range(tp)], dim=-1)
    _close(f"ce:tp{tp}/grad", grad, full.grad)


def test_report_max_diffs(runs, reference):
    """Print the largest differences measured above (run with -s to see them)."""
    print("\nmax |TP - single process| by quantity:", json.dumps({k: f"{v:.2e}" for k, v in MAX_DIFF.items()}))


def test_run_distributed_reports_failing_rank():
    with pytest.raises(DistributedTestError, match=r"rank 1 of 2 failed: ValueError: boom on purpose"):
        run_distributed(_failing_worker, 2)


# ------------------------------------------------------------------------------------------------ in-process
def test_qkv_shard_holds_own_heads():
    cfg = _cfg(gqa=True)  # 8 q heads, 4 kv heads of 4 dims
    d, hq, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    spec = sharding_of("layers.0.attn.qkv.weight", cfg)
    full = torch.arange((hq + 2 * hkv) * d, dtype=torch.float32)[:, None].expand(-1, 3).contiguous()
    rows = full[:, 0].long()
    for tp in (1, 2, 4):
        for r in range(tp):
            local = shard_tensor(full, *spec, r, tp)[:, 0].long()
            q = rows[r * hq // tp * d : (r + 1) * hq // tp * d]
            k = rows[hq * d + r * hkv // tp * d : hq * d + (r + 1) * hkv // tp * d]
            v = rows[(hq + hkv) * d + r * hkv // tp * d : (hq + hkv) * d + (r + 1) * hkv // tp * d]
            assert torch.equal(local, torch.cat([q, k, v]))


@pytest.mark.parametrize("gqa", [False, True])
def test_shard_gather_round_trip_bit_exact(gqa):
    cfg = _cfg(gqa)
    sd = _model(cfg).state_dict()
    for tp in (1, 2, 4):
        shards = [shard_state_dict(sd, r, tp, cfg) for r in range(tp)]
        for name, t in shards[0].items():
            spec = sharding_of(name, cfg)
            if spec is not None and tp > 1:
                assert t.shape[spec[0]] == sd[name].shape[spec[0]] // tp, name
        back = gather_state_dict(shards, cfg)
        assert set(back) == set(sd)
        for name, t in sd.items():
            assert torch.equal(back[name], t), name
    # the row blocks of up/gate are split separately: the local shard is [up_local; gate_local]
    up = sd["layers.0.mlp.up.weight"]
    local = shard_state_dict(sd, 1, 2, cfg)["layers.0.mlp.up.weight"]
    assert torch.equal(local, torch.cat([up[24:48], up[72:96]]))
    assert torch.equal(unshard_tensor([up[:48], up[48:]], 1, None), torch.cat([up[:48], up[48:]], dim=1))


def test_tp1_parallelize_is_identity():
    from megatron_dual.parallel.tensor_parallel import parallelize_model

    cfg = _cfg(gqa=True)
    batch = _batches()["md"]
    ref = _model(cfg)
    h_ref, s_ref = _step(ref, batch, labelled_loss)
    model = parallelize_model(_model(cfg), None)
    h, s = _step(model, batch, labelled_loss)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(s.weighted, s_ref.weighted, atol=1e-6, rtol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    logits = model.logits(batch.input_ids, batch.mask)
    torch.testing.assert_close(logits, ref.logits(batch.input_ids, batch.mask), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="already tensor parallel"):
        parallelize_model(model, None)


def test_divisibility_errors_name_the_field():
    cfg = ModelConfig(intermediate_size=3554)  # dual-470m
    cfg.validate()
    check_tp_divisibility(cfg, 2)
    with pytest.raises(ConfigError, match=r"model.intermediate_size = 3554 is not divisible by parallel.tp = 4"):
        check_tp_divisibility(cfg, 4)
    with pytest.raises(ConfigError, match=r"model.n_kv_heads = 4 is not divisible by parallel.tp = 8"):
        check_tp_divisibility(_cfg(gqa=True), 8)
    with pytest.raises(ConfigError, match=r"model.n_heads = 4 is not divisible by parallel.tp = 3"):
        shard_state_dict(_model(_cfg(False)).state_dict(), 0, 3, _cfg(False))


def test_rng_tracker_streams():
    from megatron_dual.parallel.random import TP_RNG, RNGStatesTracker, tensor_parallel_rng_tracker

    torch.manual_seed(0)
    before = torch.get_rng_state()
    t0, t1 = tensor_parallel_rng_tracker(7, 0), tensor_parallel_rng_tracker(7, 1)
    with t0.fork():
        a = torch.rand(4)
    with t1.fork(TP_RNG):
        b = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    assert not torch.equal(a, b)  # TP ranks draw different numbers
    with t0.fork():
        a2 = torch.rand(4)
    assert not torch.equal(a, a2)  # the stream advanced
    again = tensor_parallel_rng_tracker(7, 0)
    again.set_states(t0.get_states())
    with again.fork():
        x = torch.rand(4)
    with t0.fork():
        y = torch.rand(4)
    assert torch.equal(x, y)  # a restored tracker continues the same stream
    tracker = RNGStatesTracker()
    tracker.add("x", 1)
    with pytest.raises(ValueError, match="seed 1 is already used"):
        tracker.add("y", 1)
    with pytest.raises(KeyError, match="not tracked"):
        with tracker.fork("nope"):
            pass


# ------------------------------------------------------------------------------------------------ checkpoints
def _load_tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["convert_checkpoint"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_convert_checkpoint_round_trip(tmp_path):
    from safetensors.torch import load_file

    from megatron_dual.engine.checkpoint import save_checkpoint
    from megatron_dual.parallel.resharding import load_model_shard, read_checkpoint

    tool = _load_tool()
    cfg = load_config(
        overrides=[
            "model.n_layers=2",
            "model.hidden_size=32",
            "model.n_heads=8",
            "model.n_kv_heads=4",
            "model.intermediate_size=48",
            "model.vocab_size=64",
            "model.max_seq_len=32",
            "model.fused_ops=none",
            "data.seq_len=16",
        ]
    )
    model = _model(cfg.model)
    optimizers = build_optimizers(model, cfg.optimizer)
    batch = _batches()["ar"]
    for _ in range(2):
        _step(model, batch, labelled_loss)
        for o in optimizers.values():
            o.step()
    state = {"optimizers": {k: o.state_dict() for k, o in optimizers.items()}, "schedulers": {}}
    src = save_checkpoint(tmp_path / "tp1", 2, model, state, {"consumed": 4}, cfg.to_dict())
    tp2 = tmp_path / "tp2" / src.name
    tp4 = tmp_path / "tp4" / src.name
    back = tmp_path / "back" / src.name
    assert tool.main([str(src), str(tp2), "--tp", "2"]) == 0
    assert tool.main([str(tp2), str(tp4), "--tp", "4"]) == 0
    assert tool.main([str(tp4), str(back), "--tp", "1"]) == 0
    layout = json.loads((tp4 / "layout.json").read_text())
    assert layout["tp"] == 4 and len(layout["files"]["model"]) == 4
    shard = load_file(str(tp4 / "model_tp2of4.safetensors"))
    expect = shard_state_dict(model.state_dict(), 2, 4, cfg.model)
    assert all(torch.equal(shard[k], expect[k]) for k in expect)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(src / "optim.pt", weights_only=True)
    ob = torch.load(back / "optim.pt", weights_only=True)
    _assert_equal_tree(oa, ob)
    assert json.loads((back / "meta.json").read_text())["trainer_state"] == {"consumed": 4}
    full, optim, meta = read_checkpoint(tp4)
    assert all(torch.equal(full[k], a[k]) for k in a)
    for where in (src, tp4):  # a rank of a TP-2 run reads its shard from a checkpoint of any TP size
        got = load_model_shard(where, 1, 2)
        want = shard_state_dict(a, 1, 2, cfg.model)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(SystemExit, match="exists"):
        tool.main([str(src), str(tp2), "--tp", "2"])
    with pytest.raises(SystemExit, match="model.n_kv_heads = 4 is not divisible by parallel.tp = 8"):
        tool.main([str(src), str(tmp_path / "tp8"), "--tp", "8"])


def _assert_equal_tree(a, b, path="optim"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, path
