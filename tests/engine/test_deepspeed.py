"""The DeepSpeed engine on CPU (gloo, DeepSpeed's CPU accelerator): ZeRO 0-3 against the DDP engine.

One spawn of 2 ranks runs every case in turn (DeepSpeed's import and the spawn dominate the cost): ZeRO 0/1/2/3 with
Muon and with AdamW for 3 optimizer steps at alpha = 1/2, compared with one DDP process holding both slots (losses,
gradient norms, every parameter); for each stage a run saved at step 2 and resumed must equal the uninterrupted
run bit for bit; the ZeRO-3 checkpoint converted to the single-file form must give the same logits. A second spawn
of 4 ranks runs TP = 2 x ZeRO-1 over DP = 2 against one process. A third spawn of 2 ranks resumes ZeRO-2 AdamW and
ZeRO-3 Muon with a changed lr, train.steps and schedule: the same lrs and run as the DDP engine resumed alike.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install -e '.[deepspeed]')")

from toy import VOCAB, toy_model, write_random_corpus  # noqa: E402

from megatron_dual.config import load_config  # noqa: E402

STEPS = 3
STAGES = (0, 1, 2, 3)
OPTIMIZERS = ("muon", "adamw")
ROOT = Path(__file__).resolve().parents[2]
# Measured (CPU, fp32, 2 ranks, 3 layers so matrices straddle ZeRO 1/2 partitions and owners differ from holders),
# max |parameter - DDP| after 3 steps: Muon 0 (ZeRO-0), 3e-8 (1, 2), 1.2e-7 (3); AdamW 2.2e-7 (0-2), 7.8e-6 (3: its
# m / sqrt(v) amplifies reduction-order noise in near-zero gradients). Losses equal to 2.4e-7.
TOL = {"muon": dict(rtol=1e-5, atol=1e-6), "adamw": dict(rtol=1e-4, atol=5e-5)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_random_corpus(str(tmp_path_factory.mktemp("ds_corpus") / "toy_text_document"))


def _overrides(corpus, out, slots, extra):
    return [
        *toy_model(corpus, out, n_layers=3, n_heads=4),
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
        "objective.alpha=1/2",
        *extra,
    ]


def _ds(stage, opt, extra=()):
    return [
        "engine.name=deepspeed",
        f"engine.zero_stage={stage}",
        f"optimizer.name={opt}",
        "engine.reduce_bucket_mb=0.002",
        "engine.allgather_bucket_mb=0.002",
        *extra,
    ]


def _full_params(tr):
    params = list(tr.model.parameters())
    ctx = torch.no_grad()
    if getattr(tr.engine, "stage", 0) == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params)
    with ctx:
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def _probe_logits(tr):
    from megatron_dual.model.attention import AttentionMask

    ids = torch.arange(16, 16 + 12).remainder(VOCAB)[None]
    with torch.no_grad():
        return tr.model.logits(ids, AttentionMask("causal")).clone()


def _run(overrides, steps=STEPS, save_at=None):
    from megatron_dual.trainer import Trainer

    cfg = load_config(overrides=overrides)
    tr = Trainer(cfg, quiet=True)
    metrics = []
    if cfg.logging.tensorboard or cfg.logging.wandb_project:  # the whole loop, callbacks (metrics sinks) included
        step = tr.train_step
        tr.train_step = lambda b: metrics.append(step(b)) or metrics[-1]
        tr.fit()
    tr.maybe_resume()
    while tr.step < steps:
        metrics.append(tr.train_step(tr.loader.batches(tr.step)))
        if tr.step == save_at:
            tr.save()
    out = {"metrics": metrics, "params": _full_params(tr), "step": tr.step}
    if getattr(tr.engine, "stage", 0) == 3:
        out["logits"] = _probe_logits(tr)
    tr.engine.close()
    return out


def _worker(rank, world, port, jobs, result_dir):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    results = {name: _run(*args) for name, args in jobs}
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, jobs, tmp_path):
    mp.start_processes(
        _worker, args=(world, _free_port(), jobs, str(tmp_path)), nprocs=world, join=True, start_method="spawn"
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_same_run(got, ref, tol, what):
    for step, (m, r) in enumerate(zip(got["metrics"], ref["metrics"], strict=True)):
        for k in ("loss", "ar_loss", "md_loss", "grad_norm", "lr"):
            assert m[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (what, step, k, m[k], r[k])
    for name, p in ref["params"].items():
        torch.testing.assert_close(got["params"][name], p, **tol, msg=lambda s, n=name: f"{what} {n}: {s}")


def _monitor(opt):
    """Both sinks on the Muon runs when their packages are installed (wandb offline: no network)."""
    if opt != "muon":
        return []
    has = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "wandb")}
    return (["logging.tensorboard=true"] if has["tensorboard"] else []) + (
        ["logging.wandb_project=ds-test", "logging.wandb_mode=offline"] if has["wandb"] else []
    )


@pytest.fixture(scope="module")
def zero_runs(corpus, tmp_path_factory):
    """Every ZeRO case on 2 ranks, in one spawn; the DDP references in this process."""
    tmp = tmp_path_factory.mktemp("zero")
    refs = {
        opt: _run(_overrides(corpus, tmp / f"ref_{opt}", 2, [f"optimizer.name={opt}", *_monitor(opt)]))
        for opt in OPTIMIZERS
    }
    jobs = []
    for stage in STAGES:
        for opt in OPTIMIZERS:
            extra = [*_ds(stage, opt), *(_monitor(opt) if stage == 2 else [])]
            jobs.append((f"z{stage}_{opt}", (_overrides(corpus, tmp / f"z{stage}_{opt}", 1, extra),)))
        out = tmp / f"resume{stage}"
        jobs.append((f"save{stage}", (_overrides(corpus, out, 1, _ds(stage, "muon")), STEPS, 2)))
        resume = _overrides(corpus, out, 1, _ds(stage, "muon", ["checkpoint.resume=auto"]))
        jobs.append((f"resumed{stage}", (resume, STEPS, STEPS)))
    return refs, _spawn(2, jobs, tmp), tmp


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_equals_ddp(zero_runs, stage, opt):
    refs, results, _ = zero_runs
    got = results[0][f"z{stage}_{opt}"]
    _assert_same_run(got, refs[opt], TOL[opt], f"ZeRO-{stage} {opt}")
    for name, p in results[1][f"z{stage}_{opt}"]["params"].items():  # replicas bit-identical
        assert torch.equal(p, got["params"][name]), name


@pytest.mark.parametrize("stage", STAGES)
def test_zero_resume_is_bit_exact(zero_runs, stage):
    _, results, tmp = zero_runs
    whole, resumed = results[0][f"save{stage}"], results[0][f"resumed{stage}"]
    assert resumed["step"] == STEPS and len(resumed["metrics"]) == 1  # resumed at step 2, ran step 3
    assert resumed["metrics"][0]["loss"] == whole["metrics"][-1]["loss"]
    for name, p in whole["params"].items():
        assert torch.equal(resumed["params"][name], p), (stage, name)
    ck = tmp / f"resume{stage}" / "checkpoints" / "step_00000002"
    assert (ck / "meta.json").is_file() and (ck / "deepspeed").is_dir() and (ck / "rng.pt").is_file()


def test_zero3_checkpoint_converts_to_single_file_with_same_logits(zero_runs, tmp_path):
    from megatron_dual.engine.checkpoint import load_model_weights
    from megatron_dual.model.attention import AttentionMask
    from megatron_dual.model.transformer import DualTransformer

    _, results, tmp = zero_runs
    src = tmp / "resume3" / "checkpoints" / "step_00000003"
    dst = tmp_path / "single"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(src), str(dst), "--tp", "1"],
        check=True,
        capture_output=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    cfg = load_config(overrides=_overrides("x", tmp_path, 2, []))
    model = DualTransformer(cfg.model)
    load_model_weights(dst, model)
    ids = torch.arange(16, 16 + 12).remainder(VOCAB)[None]
    with torch.no_grad():
        logits = model.logits(ids, AttentionMask("causal"))
    torch.testing.assert_close(logits, results[0]["resumed3"]["logits"], rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), results[0]["resumed3"]["params"][name]), name


def test_tp2_x_zero1_over_dp2_equals_one_process(corpus, tmp_path):
    ref = _run(_overrides(corpus, tmp_path / "ref", 2, []))
    jobs = [("tp", (_overrides(corpus, tmp_path / "tp", 1, [*_ds(1, "muon"), "parallel.tp=2"]),))]
    from megatron_dual.parallel.layers import gather_state_dict

    results = _spawn(4, jobs, tmp_path)
    cfg = load_config(overrides=_overrides(corpus, tmp_path, 2, []))
    for dp_rank in (0, 1):
        full = gather_state_dict(
            [results[2 * dp_rank]["tp"]["params"], results[2 * dp_rank + 1]["tp"]["params"]], cfg.model
        )
        _assert_same_run(
            {"metrics": results[2 * dp_rank]["tp"]["metrics"], "params": full},
            ref,
            dict(rtol=1e-4, atol=1e-5),
            f"TP2 x ZeRO-1 dp {dp_rank}",
        )


@pytest.mark.parametrize("run", ["ref_muon", "z2_muon"])  # the DDP engine and the DeepSpeed engine
def test_tensorboard_event_files_hold_the_per_objective_metrics(zero_runs, run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[wandb]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, tmp = zero_runs
    events = list((tmp / run / "tb").glob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {tmp / run / 'tb'}"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "ar_loss", "md_loss", "ar_tokens", "md_tokens", "grad_norm", "lr"} <= tags
    assert [e.step for e in acc.Scalars("ar_loss")] == [1, 2, 3]


@pytest.mark.parametrize("run", ["ref_muon", "z2_muon"])
def test_wandb_offline_run_is_written_without_network(zero_runs, run):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    _, _, tmp = zero_runs
    runs = list((tmp / run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {tmp / run / 'wandb'}"
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0


# Resuming with changed lr and schedule: trained 2 steps of 4 (decay over the last step), resumed for 6 steps at
# another lr with decay over the last 5 to a floor, saved at step 4 and resumed from there once more.
BUDGET = 6 * 2 * 2 * 16  # tokens of 6 steps (micro-batch 2 x 2 slots x seq_len 16): train.steps may grow to 6
OLD_SCHEDULE = ["train.steps=4", "schedule.decay_steps=1", f"data.budget_tokens={BUDGET}"]
NEW_SCHEDULE = [
    "train.steps=6",
    "optimizer.lr=0.004",
    "schedule.decay_steps=5",
    "schedule.min_lr_ratio=0.1",
    f"data.budget_tokens={BUDGET}",
    "checkpoint.resume=auto",
]
SCHEDULE_CASES = ((2, "adamw"), (3, "muon"))  # (ZeRO stage, optimizer): both flat layouts, both optimizers


def _schedule_phases(overrides):
    """(job name suffix, _run args) of the three phases in ``overrides(extra)``'s output directory."""
    return (
        ("before", (overrides(OLD_SCHEDULE), 2, 2)),
        ("changed", (overrides(NEW_SCHEDULE), 6, 4)),
        ("again", (overrides(NEW_SCHEDULE), 6)),
    )


@pytest.fixture(scope="module")
def schedule_runs(corpus, tmp_path_factory):
    """The three phases on the DDP engine (one process, both slots) and on ZeRO (2 ranks, one spawn)."""
    tmp = tmp_path_factory.mktemp("schedule")
    refs, jobs = {}, []
    for stage, opt in SCHEDULE_CASES:
        out = tmp / f"ddp_{opt}"
        for phase, args in _schedule_phases(
            lambda e, o=out, n=opt: _overrides(corpus, o, 2, [f"optimizer.name={n}", *e])
        ):
            refs[f"{opt}_{phase}"] = _run(*args)
        out = tmp / f"z{stage}_{opt}"
        for phase, args in _schedule_phases(lambda e, o=out, s=stage, n=opt: _overrides(corpus, o, 1, _ds(s, n, e))):
            jobs.append((f"z{stage}_{opt}_{phase}", args))
    return refs, _spawn(2, jobs, tmp)


@pytest.mark.parametrize("stage,opt", SCHEDULE_CASES)
def test_zero_resume_applies_changed_lr_and_schedule_as_ddp(schedule_runs, stage, opt):
    from megatron_dual.optim.schedules import lr_multiplier

    refs, results = schedule_runs
    changed, again = (results[0][f"z{stage}_{opt}_{p}"] for p in ("changed", "again"))
    assert [len(r["metrics"]) for r in (changed, again)] == [4, 2]  # steps 3-6, then steps 5-6
    lrs = [0.004 * lr_multiplier(s, 6, "wsd", 0, 5, 0.1) for s in range(2, 6)]
    assert lrs[0] != pytest.approx(0.007)  # the old settings would train step 3 at 0.007
    assert [m["lr"] for m in changed["metrics"]] == pytest.approx(lrs, rel=1e-12)
    assert [m["lr"] for m in refs[f"{opt}_changed"]["metrics"]] == pytest.approx(lrs, rel=1e-12)
    _assert_same_run(changed, refs[f"{opt}_changed"], TOL[opt], f"ZeRO-{stage} {opt} resumed with new schedule")
    # resumed from the checkpoint saved after the change: the new schedule goes on, bit for bit
    assert again["metrics"] == changed["metrics"][2:]
    for name, p in changed["params"].items():
        assert torch.equal(again["params"][name], p), (stage, opt, name)


def test_srun_launch_exports_local_rank_for_deepspeed(monkeypatch):
    """Under srun only SLURM's variables are set; DeepSpeed's engine asserts LOCAL_RANK is set (and reads RANK), so
    the engine exports the launch's rank, local rank and world size torchrun-style once the group is joined
    (examples/slurm/dual-7b-zero3-tp2.sbatch failed in deepspeed.initialize without it)."""
    from megatron_dual.engine import deepspeed as ds_engine

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so what the engine exports is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setattr(ds_engine.dist, "is_initialized", lambda: True)
    ds_engine._ensure_process_group(torch.device("cpu"))
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("13", "5", "16")
