"""The loop's seams: a custom callback and a stand-in engine run through the unchanged loop; the data loader's
prefetch, state and slicing; the step's bookkeeping reads the device once."""

import contextlib
import json

import numpy as np
import pytest
import torch
from toy import VOCAB, toy_model

from megatron_dual.callbacks import Callback
from megatron_dual.config import ConfigError, load_config
from megatron_dual.data.dataloader import TrainDataLoader, build_data
from megatron_dual.data.indexed import IndexedDatasetWriter
from megatron_dual.engine.base import Engine
from megatron_dual.objectives import AR, MD, ObjectiveBatcher, ObjectiveSchedule
from megatron_dual.trainer import Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("seams") / "toy_text_document")
    rng = np.random.default_rng(3)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for _ in range(60):
            w.add_document([1] + rng.integers(16, VOCAB, int(rng.integers(8, 40))).tolist())
    return prefix


def _cfg(corpus, out, *extra):
    return load_config(
        overrides=[
            *toy_model(corpus, out, n_layers=1),
            "train.micro_batch_size=2",
            "train.grad_accum=4",
            "objective.alpha=1/2",
            "train.steps=4",
            "schedule.decay_steps=1",
            "train.eval_interval=2",
            "train.eval_batches=1",
            "checkpoint.interval=2",
            "logging.plot=false",
            *extra,
        ]
    )


class Recorder(Callback):
    """Records the hooks in order and the per-objective losses; counts steps across resumes (its state)."""

    def __init__(self):
        super().__init__()
        self.hooks, self.losses, self.steps_seen = [], [], 0

    def pre_train(self):
        self.hooks.append("pre_train")

    def pre_step(self, step):
        self.hooks.append(f"pre_step {step}")

    def post_step(self, step, metrics):
        self.hooks.append(f"post_step {step}")
        metrics["recorder_mark"] = step

    def log_metrics(self, step, metrics):
        self.hooks.append(f"log_metrics {step}")
        self.losses.append((metrics["ar_loss"], metrics["md_loss"]))
        self.steps_seen += 1

    def end_step(self, step):
        self.hooks.append(f"end_step {step}")

    def post_train(self, summary):
        self.hooks.append("post_train")

    def close(self):
        self.hooks.append("close")

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state.get("steps_seen", 0)


class StandInEngine(Engine):
    """No data parallelism, plain SGD: enough to drive the loop, recording how the loop drives it."""

    precision = "fp32"

    def __init__(self, model, parallel, cfg, device):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05)
        self.calls = []

    def autocast(self):
        return contextlib.nullcontext()

    def zero_grad(self):
        self.calls.append("zero_grad")
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss, *, last):
        self.calls.append(f"backward last={last}")
        loss.backward()

    def reduce_gradients(self):
        self.calls.append("reduce")

    def clip_grad_norm(self, max_norm):
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or float("inf"))

    def step(self):
        self.calls.append("step")
        self.opt.step()

    @property
    def lr(self):
        return self.opt.param_groups[0]["lr"]

    def state_dict(self):
        return {"optimizers": {"sgd": self.opt.state_dict()}, "schedulers": {}}

    def load_state_dict(self, state, source="checkpoint"):
        self.calls.append("load_state_dict")
        self.opt.load_state_dict(state["optimizers"]["sgd"])


def test_custom_callback_and_stand_in_engine_run_the_loop(corpus, tmp_path):
    rec = Recorder()
    tr = Trainer(_cfg(corpus, tmp_path / "run"), quiet=True, callbacks=[rec], engine=StandInEngine)
    tr.fit(max_steps=3)
    assert rec.hooks[:6] == ["pre_train", "pre_step 1", "post_step 1", "log_metrics 1", "end_step 1", "pre_step 2"]
    assert rec.hooks[-2:] == ["post_train", "close"] and len(rec.losses) == 3
    assert all(np.isfinite(a) and np.isfinite(m) for a, m in rec.losses)
    per_step = [
        "zero_grad",
        "backward last=False",
        "backward last=False",
        "backward last=False",
        "backward last=True",
        "reduce",
        "step",
    ]
    assert tr.engine.calls == per_step * 3
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["recorder_mark"] for r in lines] == [1, 2, 3]  # metrics added in post_step reach the sinks
    # resume: the stand-in engine's state and the callback's state come back from the step-2 checkpoint
    again = Recorder()
    tr2 = Trainer(_cfg(corpus, tmp_path / "run"), quiet=True, callbacks=[again], engine=StandInEngine)
    tr2.fit()
    assert tr2.engine.calls[0] == "load_state_dict" and tr2.step == 4
    assert again.steps_seen == 2 + 2  # two steps before the checkpoint, two after the resume


def test_callbacks_from_config_import_paths(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "c", f"train.callbacks=[{__name__}:Recorder]", "train.steps=1")
    tr = Trainer(cfg, quiet=True)
    (rec,) = [c for c in tr.callbacks if isinstance(c, Recorder)]
    tr.fit()
    assert len(rec.losses) == 1
    with pytest.raises(ConfigError, match=r"train.callbacks: cannot import 'no_such_module_xyz'"):
        Trainer(_cfg(corpus, tmp_path / "d", "train.callbacks=[no_such_module_xyz:Thing]"), quiet=True)
    with pytest.raises(ConfigError, match=r"train.callbacks: module 'json' has no 'Nope'"):
        Trainer(_cfg(corpus, tmp_path / "e", "train.callbacks=[json:Nope]"), quiet=True)
    with pytest.raises(ConfigError, match=r"is not a megatron_dual.callbacks.Callback"):
        Trainer(_cfg(corpus, tmp_path / "f", "train.callbacks=[collections:OrderedDict]"), quiet=True)


def _loader(cfg, data, dp_rank=0, dp=1, prefetch=False):
    schedule = ObjectiveSchedule(cfg.objective.alpha, dp, cfg.train.grad_accum)
    return TrainDataLoader(
        data.train,
        data.fingerprint,
        schedule,
        ObjectiveBatcher(cfg.objective, 7),
        seed=cfg.data.seed,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=dp_rank,
        prefetch=prefetch,
    )


def _same(a, b):
    return (
        a.objective == b.objective
        and torch.equal(a.input_ids, b.input_ids)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.weights, b.weights)
        and torch.equal(a.mask.doc_ids, b.mask.doc_ids)
    )


def test_loader_prefetch_state_and_resume(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "l")
    data = build_data(cfg)
    plain, ahead = _loader(cfg, data), _loader(cfg, data, prefetch=True)
    steps = [(plain.batches(s), ahead.batches(s)) for s in range(5)]
    for p, a in steps:
        assert len(p.batches) == 4 and all(_same(x, y) for x, y in zip(p.batches, a.batches, strict=True))
    # the prefetched sixth step is not consumed: the state covers exactly the steps handed out
    assert ahead.state_dict()["consumed_samples"] == 5 * 8 == plain.state_dict()["consumed_samples"]
    resumed = _loader(cfg, data, prefetch=True)
    resumed.load_state_dict(ahead.state_dict())
    assert all(_same(x, y) for x, y in zip(resumed.batches(5).batches, plain.batches(5).batches, strict=True))
    ahead.close()
    resumed.close()
    other = dict(plain.state_dict(), fingerprint="0" * 64)
    with pytest.raises(ValueError, match="different dataset"):
        _loader(cfg, data).load_state_dict(other)


def test_loader_slices_the_global_batch_over_data_parallel_ranks(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "s")
    data = build_data(cfg)
    single = _loader(cfg, data).batches(3).batches  # 4 slots in one process
    cfg.train.grad_accum = 2
    halves = [_loader(cfg, data, dp_rank=r, dp=2).batches(3).batches for r in (0, 1)]
    assert all(_same(x, y) for x, y in zip(single, halves[0] + halves[1], strict=True))
    assert {b.objective for b in single} == {AR, MD}


def _counting(reads, name, fn):
    def counted(self, *a, **k):
        reads[name] += 1
        return fn(self, *a, **k)

    return counted


def _device_reads(corpus, out, slots, monkeypatch):
    tr = Trainer(_cfg(corpus, out, f"train.grad_accum={slots}", "objective.alpha=1/2"), quiet=True)
    batches = tr.loader.batches(0)
    reads = {"item": 0, "tolist": 0}
    with monkeypatch.context() as mp:
        for name in reads:
            mp.setattr(torch.Tensor, name, _counting(reads, name, getattr(torch.Tensor, name)))
        m = tr.train_step(batches)
    assert m["ar_tokens"] > 0 and m["md_tokens"] > 0
    return reads


def test_step_reads_the_device_once_per_step_not_per_micro_batch(corpus, tmp_path, monkeypatch):
    two = _device_reads(corpus, tmp_path / "a", 2, monkeypatch)
    eight = _device_reads(corpus, tmp_path / "b", 8, monkeypatch)
    # token counts and the step's sums: one .tolist() each; .item(): the gradient norm (and the optimizers' own)
    assert two == eight and two["tolist"] == 2


def test_mfu_counts_the_flops_the_slots_execute(corpus, tmp_path, monkeypatch):
    import megatron_dual.callbacks.monitoring as mon
    import megatron_dual.trainer as trainer_mod
    from megatron_dual.model.flops import objective_batch_flops

    monkeypatch.setattr(trainer_mod, "peak_flops", lambda device: 1e12)  # pretend a GPU of known peak
    monkeypatch.setattr(mon, "peak_flops", lambda device: 1e12)
    monkeypatch.setattr(mon, "matmul_ceiling", lambda device: 5e11)
    rec = Recorder()
    cfg = _cfg(corpus, tmp_path / "m", "train.steps=1")
    tr = Trainer(cfg, quiet=True, callbacks=[rec])
    tr.fit()
    line = json.loads(open(tmp_path / "m" / "metrics.jsonl").readline())
    expect = sum(objective_batch_flops(cfg.model, b)["total"] for b in tr.batches.batches)
    assert tr.batches.flops == pytest.approx(expect) and expect > 0
    assert line["mfu"] == pytest.approx(expect / line["step_time"] / 1e12)
    assert line["mfu_ceiling"] == pytest.approx(2 * line["mfu"])


def test_init_from_starts_a_fresh_run_from_trained_weights(corpus, tmp_path):
    a = Trainer(_cfg(corpus, tmp_path / "a", "train.steps=2"), quiet=True)
    a.fit()
    trained = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    ckpt_dir = tmp_path / "a" / "checkpoints" / "step_00000002"
    (ckpt_dir / "optim.pt").unlink()  # as an imported (HF / reference) checkpoint: weights only
    b = Trainer(_cfg(corpus, tmp_path / "b", "train.steps=1", f"checkpoint.init_from={tmp_path / 'a'}"), quiet=True)
    b._start()
    assert b.step == 0 and b.resumed_from is None
    for n, p in b.model.named_parameters():
        assert torch.equal(p, trained[n]), n
    b.fit()  # trains on from there (fresh optimizer state and data order)
    assert b.step == 1
    bad = Trainer(_cfg(corpus, tmp_path / "c", f"checkpoint.init_from={tmp_path / 'nowhere'}"), quiet=True)
    with pytest.raises(Exception, match=r"checkpoint.init_from = .*nowhere.* does not exist"):
        bad.fit()
