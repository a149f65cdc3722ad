import pytest
import torch

from megatron_dual.config import ScheduleConfig, load_config
from megatron_dual.model import DualTransformer
from megatron_dual.optim.muon import Muon, build_optimizers
from megatron_dual.optim.schedules import build_scheduler, lr_multiplier


def _run(opt_factory, params, grads_seq):
    opt = opt_factory(params)
    for grads in grads_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def test_muon_matches_torch_muon():
    torch.manual_seed(0)
    w0 = torch.randn(24, 16)
    grads = [[torch.randn(24, 16)] for _ in range(4)]
    ours = _run(
        lambda ps: Muon(ps, lr=0.01, weight_decay=0.1, adjust_lr="match_rms_adamw"),
        [torch.nn.Parameter(w0.clone())],
        grads,
    )
    ref = _run(
        lambda ps: torch.optim.Muon(ps, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
        [torch.nn.Parameter(w0.clone())],
        grads,
    )
    # torch's Newton-Schulz runs in bf16 even on CPU, ours in fp32 there: agree to bf16 precision of the updates
    # (each step moves the weights by ~lr * 0.2 * sqrt(24) ~ 1e-2).
    assert (ours[0] - w0).abs().max() > 1e-2
    torch.testing.assert_close(ours[0], ref[0], atol=6e-4, rtol=0)


def test_muon_splits_equal_separate_parameters():
    torch.manual_seed(1)
    blocks = [torch.randn(8, 12), torch.randn(4, 12), torch.randn(4, 12)]
    grads = [[torch.randn(16, 12)] for _ in range(3)]
    fused = _run(
        lambda ps: Muon([{"params": ps, "splits": [8, 4, 4]}], lr=0.02), [torch.nn.Parameter(torch.cat(blocks))], grads
    )[0]
    separate = _run(
        lambda ps: Muon(ps, lr=0.02),
        [torch.nn.Parameter(b.clone()) for b in blocks],
        [list(g[0].split([8, 4, 4])) for g in grads],
    )
    torch.testing.assert_close(fused, torch.cat(separate), atol=1e-6, rtol=1e-6)


def test_muon_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="do not add up"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "splits": [1, 2]}])


def test_build_optimizers_partition():
    cfg = load_config(preset="tiny")
    model = DualTransformer(cfg.model)
    opts = build_optimizers(model, cfg.optimizer)
    muon = {id(p) for g in opts["muon"].param_groups for p in g["params"]}
    adam = {id(p) for g in opts["adamw"].param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adam) and len(muon) + len(adam) == len(names)
    trunk = {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {names[i] for i in muon} == trunk
    assert "embed.weight" in {names[i] for i in adam} and "head.out.bias" in {names[i] for i in adam}
    qkv = [g for g in opts["muon"].param_groups if g["splits"] == [128, 128, 128]]
    assert len(qkv) == 1 and len(qkv[0]["params"]) == cfg.model.n_layers


def test_wsd_schedule():
    f = [lr_multiplier(s, 10, "wsd", 0, 4) for s in range(10)]
    assert f[:6] == [1.0] * 6
    assert f[6:] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_multiplier(0, 10, "wsd", 2, 4) == 0.5  # warmup
    assert lr_multiplier(9, 10, "wsd", 0, 4, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.25)


def _lr_sequence(total_steps: int, cfg: ScheduleConfig) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = build_scheduler(opt, total_steps, cfg)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def test_scheduler_reads_decay_steps_as_a_count_or_a_fraction():
    assert _lr_sequence(10, ScheduleConfig(decay_steps=4)) == [1.0] * 7 + [0.75, 0.5, 0.25]
    # an integer count: the multipliers of lr_multiplier (the scheduler's formula before fractions), bit for bit
    for cfg in (ScheduleConfig(decay_steps=75), ScheduleConfig(warmup_steps=10, decay_steps=75, min_lr_ratio=0.1)):
        assert _lr_sequence(300, cfg) == [
            lr_multiplier(s, 300, "wsd", cfg.warmup_steps, 75, cfg.min_lr_ratio) for s in range(300)
        ]
    # the demo's 0.25 of 300 steps is its former 75, exactly
    assert _lr_sequence(300, ScheduleConfig(decay_steps=0.25)) == _lr_sequence(300, ScheduleConfig(decay_steps=75))
    assert _lr_sequence(3, ScheduleConfig(decay_steps=0.25)) == [1.0, 1.0, 1.0]  # 1 decay step: the last at 1/1


def test_cosine_schedule():
    assert lr_multiplier(0, 100, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(50, 100, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(100, 100, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, "linear")
