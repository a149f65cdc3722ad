"""Aligned MLP (``model.pad_intermediate_to``): the padded model is the unpadded one, to fp32 rounding.

Same initialisation (bit-exact logical weights), same losses, gradients and parameters after Muon and AdamW steps
(Muon's lr scale from the logical width), padded units exactly zero throughout, state dicts and optimizer state at
the logical layout (checkpoints interchangeable with unpadded models), and TP=2 on gloo equal to one process.
"""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_dual.config import ConfigError, ModelConfig, OptimizerConfig
from megatron_dual.model.loss import labelled_loss
from megatron_dual.model.padding import logical_numel, pad, padding_of, unpad
from megatron_dual.model.transformer import DualTransformer, param_counts
from megatron_dual.objectives import ar_batch, md_batch
from megatron_dual.optim.muon import build_optimizers
from megatron_dual.parallel.testing import run_distributed

TOL = dict(atol=2e-6, rtol=2e-5)  # fp32 rounding (another summation order), far below any modelling difference


def _cfg(pad: int) -> ModelConfig:
    # 40 -> 64: Muon's scale sqrt(max(rows, cols)) would differ by 26% if taken from the padded width
    cfg = ModelConfig(
        n_layers=2,
        hidden_size=32,
        n_heads=4,
        intermediate_size=40,
        vocab_size=64,
        max_seq_len=32,
        attention_backend="sdpa",
        fused_ops="none",
        pad_intermediate_to=pad,
    )
    cfg.validate()
    return cfg


def _model(pad: int, perturb: bool = True) -> DualTransformer:
    torch.manual_seed(0)
    model = DualTransformer(_cfg(pad))
    if perturb:  # the reference init zeroes the down projections: give every logical weight real values
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                spec = padding_of(p)
                noise = 0.3 * torch.randn(spec.logical_shape(p.shape) if spec else p.shape, generator=g)
                p.copy_(model_pad(noise, p))
    return model


def model_pad(logical: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    spec = padding_of(p)
    return pad(logical, spec) if spec is not None else logical


def _batches() -> dict:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(16, 64, (2, 17), generator=g)
    tokens[:, 0] = 1
    tokens[0, 9] = 1
    doc_ids = (tokens == 1).cumsum(dim=1)
    md = md_batch(tokens, doc_ids, torch.Generator().manual_seed(3), mask_token_id=4, n_special=16, t_min=0.5)
    return {"ar": ar_batch(tokens, doc_ids), "md": md}


def _loss(model: DualTransformer, batch) -> torch.Tensor:
    sums = labelled_loss(model.head, model(batch.input_ids, batch.mask), batch.labels, batch.weights, 1e-2)
    return sums.weighted / max(1, sums.count)


def _logical(model: DualTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _padded_entries(model: DualTransformer) -> list[torch.Tensor]:
    """Every padded entry of every padded parameter (and of its gradient)."""
    out = []
    for p in model.parameters():
        spec = padding_of(p)
        if spec is None:
            continue
        keep = model_pad(torch.ones(spec.logical_shape(p.shape), dtype=torch.bool), p)
        out.append(p.detach()[~keep])
        if p.grad is not None:
            out.append(p.grad[~keep])
    return out


def test_shapes_counts_and_init_are_logical():
    padded, plain = _model(64, perturb=False), _model(1, perturb=False)
    mlp = padded.layers[0].mlp
    assert mlp.up.weight.shape == (128, 32) and mlp.down.weight.shape == (32, 64)
    assert (mlp.intermediate, mlp.width) == (40, 64)
    assert plain.layers[0].mlp.up.weight.shape == (80, 32) and padding_of(plain.layers[0].mlp.up.weight) is None
    assert param_counts(padded) == param_counts(plain)
    sd_pad, sd_plain = padded.state_dict(), plain.state_dict()
    assert list(sd_pad) == list(sd_plain)
    for k in sd_plain:  # the same random numbers: bit-exact
        assert torch.equal(sd_pad[k], sd_plain[k]), k
    assert all(bool((x == 0).all()) for x in _padded_entries(padded))
    assert logical_numel(mlp.up.weight) == 80 * 32


def test_losses_gradients_equal_and_padding_gets_zero_gradient():
    padded, plain = _model(64), _model(1)
    for obj, batch in _batches().items():
        for m in (padded, plain):
            m.zero_grad(set_to_none=True)
        lp, lu = _loss(padded, batch), _loss(plain, batch)
        lp.backward()
        lu.backward()
        torch.testing.assert_close(lp, lu, **TOL, msg=obj)
        for (name, p), q in zip(padded.named_parameters(), plain.parameters(), strict=True):
            spec = padding_of(p)
            got = unpad(p.grad, spec) if spec else p.grad
            torch.testing.assert_close(got, q.grad, **TOL, msg=f"{obj} {name}")
        zeros = _padded_entries(padded)
        assert zeros and all(bool((x == 0).all()) for x in zeros)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_optimizer_steps_equal_and_padding_stays_zero(optimizer):
    models = {"padded": _model(64), "plain": _model(1)}
    # AdamW's g / (|g| + eps) turns a 1e-8 rounding difference of a ~1e-8 gradient entry into an O(lr) update
    # difference at the recipe's eps = 1e-8 (so would any change of summation order): a larger eps keeps the
    # comparison about the padding, not about that conditioning
    cfg = OptimizerConfig(name=optimizer, lr=0.02, weight_decay=0.1, eps=1e-3)
    opts = {k: build_optimizers(m, cfg) for k, m in models.items()}
    batches = list(_batches().values())
    for step in range(3):
        for k, m in models.items():
            m.zero_grad(set_to_none=True)
            _loss(m, batches[step % 2]).backward()
            for o in opts[k].values():
                o.step()
        got, want = _logical(models["padded"]), _logical(models["plain"])
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=f"step {step} {name}")
        assert all(bool((x == 0).all()) for x in _padded_entries(models["padded"]))


def test_checkpoints_interchange_with_unpadded_models():
    """Model and optimizer state of a padded model load into an unpadded one and back; training goes on equal."""
    padded, plain = _model(64), _model(1)
    opt_pad = build_optimizers(padded, OptimizerConfig(lr=0.02))
    batch = _batches()["md"]
    _loss(padded, batch).backward()
    for o in opt_pad.values():
        o.step()
    state = {k: copy.deepcopy(o.state_dict()) for k, o in opt_pad.items()}
    shapes = {tuple(e["momentum_buffer"].shape) for e in state["muon"]["state"].values()}
    assert shapes == {(96, 32), (32, 32), (80, 32), (32, 40)}  # Muon momentum at the logical shapes
    assert sorted(g["splits"] for g in state["muon"]["param_groups"] if g["splits"]) == [[32, 32, 32], [40, 40]]
    plain.load_state_dict(padded.state_dict())
    opt_plain = build_optimizers(plain, OptimizerConfig(lr=0.02))
    for k, o in opt_plain.items():
        o.load_state_dict(state[k])
    # and back into a fresh padded model: padding restored, the padded entries zero
    again = _model(64, perturb=False)
    again.load_state_dict(plain.state_dict())
    opt_again = build_optimizers(again, OptimizerConfig(lr=0.02))
    for k, o in opt_again.items():
        o.load_state_dict(copy.deepcopy(opt_plain[k].state_dict()))
    assert all(bool((x == 0).all()) for x in _padded_entries(again))
    for m, opts in ((plain, opt_plain), (again, opt_again)):
        m.zero_grad(set_to_none=True)
        _loss(m, _batches()["ar"]).backward()
        for o in opts.values():
            o.step()
    got, want = _logical(again), _logical(plain)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    with pytest.raises(ConfigError, match="pad_intermediate_to"):
        DualTransformer(_cfg(0))


def _tp_worker(rank: int, world: int) -> dict:
    from megatron_dual.parallel.state import ParallelState
    from megatron_dual.parallel.tensor_parallel import parallelize_model

    par = ParallelState(world, rank, tp=world)
    model = parallelize_model(_model(64), par.tp_group)
    mlp = model.layers[0].mlp
    out: dict = {"local": (tuple(mlp.up.weight.shape), tuple(mlp.down.weight.shape), mlp.intermediate, mlp.width)}
    opts = build_optimizers(model, OptimizerConfig(lr=0.02))
    opts["muon"].distribute(par)
    batch = _batches()["md"]
    loss = _loss(model, batch)
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = {
        n: (unpad(p.grad, padding_of(p)) if padding_of(p) else p.grad).clone() for n, p in model.named_parameters()
    }
    for o in opts.values():
        o.step()
    out["state"] = model.state_dict()
    out["zeros"] = all(bool((x == 0).all()) for x in _padded_entries(model))
    return out


def test_tensor_parallel_padded_equals_single_process_unpadded():
    from megatron_dual.parallel.layers import gather_state_dict

    results = run_distributed(_tp_worker, 2)
    assert results[0]["local"] == ((128, 32), (32, 64), 20, 64)  # each rank's shard padded to 64 on its own
    plain = _model(1)
    opts = build_optimizers(plain, OptimizerConfig(lr=0.02))
    loss = _loss(plain, _batches()["md"])
    loss.backward()
    want_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    for o in opts.values():
        o.step()
    cfg = _cfg(1)
    torch.testing.assert_close(results[0]["loss"], loss.detach(), **TOL)
    grads = gather_state_dict([r["grads"] for r in results], cfg)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, **TOL, msg=name)
    state = gather_state_dict([r["state"] for r in results], cfg)
    for name, want in plain.state_dict().items():
        torch.testing.assert_close(state[name], want, **TOL, msg=name)
    assert all(r["zeros"] for r in results)
