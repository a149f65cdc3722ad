"""Data parallelism on CPU with gloo: N ranks x M slots must equal one process with N*M slots.

Each case runs the real Trainer for 3 optimizer steps in N spawned processes and in this process, and compares the
per-step losses, every gradient just before each optimizer step, and every parameter after the last step.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from toy import toy_model, write_random_corpus

from megatron_dual.config import load_config
from megatron_dual.trainer import Trainer

STEPS = 3
KEYS = (
    "loss",
    "ar_loss",
    "md_loss",
    "prefix_loss",
    "ar_tokens",
    "md_tokens",
    "prefix_tokens",
    "grad_norm",
    "lr",
    "alpha",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_random_corpus(str(tmp_path_factory.mktemp("ddp_corpus") / "toy_text_document"))


def _overrides(corpus, out, slots, extra):
    return [
        *toy_model(corpus, out, n_heads=4),
        "train.micro_batch_size=2",
        f"train.grad_accum={slots}",
        f"train.steps={STEPS}",
        "schedule.decay_steps=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.resume=none",
        "logging.plot=false",
        "parallel.bucket_mb=0.002",
        "train.threads=1",
        *extra,
    ]


def _run_steps(cfg, save=False):
    """Run STEPS optimizer steps (then checkpoint when ``save``); return (metrics per step, grads per step, final
    params)."""
    tr = Trainer(cfg, quiet=True)
    grads: list[dict[str, torch.Tensor]] = []
    first = next(iter(tr.engine.optimizers.values()))
    orig = first.step

    def capture(*a, **k):
        grads.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters()})
        return orig(*a, **k)

    first.step = capture
    metrics = [tr.train_step(tr.loader.batches(s)) for s in range(STEPS)]
    if save:
        tr.save()
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    return metrics, grads, params


def _worker(rank, world, port, overrides, result_dir, save=False):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    out = _run_steps(load_config(overrides=overrides), save=save)
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    # (dp ranks, slots per rank, extra overrides)
    (2, 1, ["objective.alpha=1"]),
    (2, 1, ["objective.alpha=1/2"]),
    (2, 2, ["objective.alpha=0"]),
    (4, 1, ["objective.alpha=3/4"]),
    (4, 1, ["objective.alpha=1/2", "optimizer.name=adamw"]),
    (2, 2, ["objective.alpha=3/4", "parallel.distributed_muon=false"]),
    # three objectives (prefix-LM), an alpha schedule, the reference recipe
    (2, 2, ["objective.mix=ar=1/2 md=1/4 prefix=1/4"]),
    (4, 1, ["objective.mix=ar=1/2 md=1/4 prefix=1/4", "optimizer.name=adamw"]),
    (2, 1, ["objective.recipe=reference", "objective.alpha=1/2", "objective.alpha_schedule=0:1, 1:1/2"]),
]


@pytest.mark.parametrize("dp,slots,extra", CASES, ids=lambda c: str(c))
def test_data_parallel_equals_single_process(corpus, tmp_path, monkeypatch, dp, slots, extra):
    ref_cfg = load_config(overrides=_overrides(corpus, tmp_path / "ref", dp * slots, extra))
    ref_metrics, ref_grads, ref_params = _run_steps(ref_cfg)

    overrides = _overrides(corpus, tmp_path / "ddp", slots, extra)
    mp.start_processes(
        _worker, args=(dp, _free_port(), overrides, str(tmp_path)), nprocs=dp, join=True, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(dp)]
    metrics, grads, params = results[0]
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        for k in KEYS:
            if k in r:
                assert m[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (step, k, m[k], r[k])
        for name, g in ref_grads[step].items():
            torch.testing.assert_close(grads[step][name], g, rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    for other in results[1:]:  # replicas stay bit-identical
        for name, p in other[2].items():
            assert torch.equal(p, params[name]), name


@pytest.mark.parametrize(
    "slots,extra", [(1, ["objective.alpha=1/2"]), (2, ["objective.alpha=3/4", "optimizer.name=adamw"])], ids=str
)
def test_tensor_x_data_parallel_equals_single_process_and_checkpoint_reshards(corpus, tmp_path, slots, extra):
    """TP 2 x DP 2 (4 gloo ranks; Muon distributed over DP with TP shards gathered, or AdamW) equals one process with
    2 x slots slots; the TP-sharded checkpoint it writes resumes in a single process with the same parameters."""
    from megatron_dual.parallel.layers import gather_state_dict

    extra = [*extra, "checkpoint.interval=3"]
    ref_cfg = load_config(overrides=_overrides(corpus, tmp_path / "ref", 2 * slots, extra))
    ref_metrics, ref_grads, ref_params = _run_steps(ref_cfg)
    overrides = _overrides(corpus, tmp_path / "tp", slots, [*extra, "parallel.tp=2"])
    mp.start_processes(
        _worker, args=(4, _free_port(), overrides, str(tmp_path), True), nprocs=4, join=True, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    metrics = results[0][0]
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        for k in KEYS:
            if k in r:
                assert m[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (step, k, m[k], r[k])
        full = gather_state_dict([results[0][1][step], results[1][1][step]], ref_cfg.model)
        for name, g in ref_grads[step].items():
            torch.testing.assert_close(full[name], g, rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    for dp_rank in (0, 1):
        full = gather_state_dict([results[2 * dp_rank][2], results[2 * dp_rank + 1][2]], ref_cfg.model)
        for name, p in ref_params.items():
            # AdamW's m / sqrt(v) turns reduction-order noise in near-zero gradients into updates of up to lr:
            # parameters get an absolute tolerance of a few 1e-5 (a wrong shard is off by ~1e-2).
            torch.testing.assert_close(full[name], p, rtol=1e-4, atol=5e-5, msg=lambda s, n=name: f"{n}: {s}")
    ckpt_dir = tmp_path / "tp" / "checkpoints" / "step_00000003"
    assert (ckpt_dir / "layout.json").is_file() and (ckpt_dir / "model_tp1of2.safetensors").is_file()
    single = Trainer(
        load_config(overrides=_overrides(corpus, tmp_path / "tp", 2 * slots, [*extra, "checkpoint.resume=auto"])),
        quiet=True,
    )
    assert single.maybe_resume() == ckpt_dir and single.step == 3
    for name, p in single.model.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[name], rtol=1e-4, atol=5e-5)
