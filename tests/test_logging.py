import io
import json

import pytest

from megatron_dual.logging import JSONLSink, Progress, format_duration, plot_metrics, read_metrics


def test_metrics_logger_fresh_and_resumed(tmp_path):
    path = tmp_path / "m.jsonl"
    log = JSONLSink(path)
    for step in range(1, 6):
        log.log(step, {"ar_loss": 1.0 / step, "grad_norm": float("nan") if step == 5 else 0.5})
    log.close()
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[4]["grad_norm"] == "nan"
    with open(path, "a") as f:
        f.write('{"step": 6, "ar_lo')  # a line cut by a kill
    # resuming from the step-3 checkpoint drops the records of steps that will be redone
    log = JSONLSink(path, resume_step=3)
    log.log(4, {"ar_loss": 0.2})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    # a fresh run starts the file anew
    JSONLSink(path).close()
    assert read_metrics(path) == []


def test_read_metrics_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: expected a JSON object"):
        read_metrics(path)
    path.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON object"):
        read_metrics(path)


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(20, start_step=0, print_every=10, stream=out)
    for step in range(1, 21):
        p.update(step, {"ar_loss": 3.25, "md_loss": 4.5, "lr": 0.01, "tokens_per_s": 12345.0})
    p.write("step 20: val_ar_loss 3.1")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("step 10/20 (50%) | ar 3.250 | md 4.500 | lr 1.00e-02 | 12.3k tok/s")
    assert "ETA" in lines[0] and lines[2] == "step 20: val_ar_loss 3.1"
    quiet = io.StringIO()
    q = Progress(20, disable=True, stream=quiet)
    q.update(10, {"ar_loss": 1.0})
    q.write("x")
    assert quiet.getvalue() == ""


def test_progress_eta_leaves_out_a_slow_first_step(monkeypatch):
    """A first step of 100 s (compilation, warm-up) then 1 s steps: at step 10 of 20 the ETA is 10 s, not the 109 s
    an average since the start gives; the pace is that of the last ETA_WINDOW steps."""
    from megatron_dual import logging as md_logging

    now = [0.0]
    monkeypatch.setattr(md_logging.time, "perf_counter", lambda: now[0])
    p = Progress(20, print_every=10, stream=io.StringIO())
    now[0] = 100.0
    p.update(1, {})
    assert p.eta(1) == pytest.approx(100.0 * 19)  # one update: the average since the start is all there is
    for step in range(2, 11):
        now[0] += 1.0
        p.update(step, {})
    assert p.eta(10) == pytest.approx(10.0)
    q = Progress(1000, stream=io.StringIO())
    for step in range(1, 301):  # 2 s steps, then 0.5 s steps: the window forgets the slow ones
        now[0] += 2.0 if step <= 150 else 0.5
        q.update(step, {})
    assert q.eta(300) == pytest.approx(0.5 * 700)


def test_format_duration():
    assert format_duration(5) == "5s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(float("nan")) == "?"


def test_plot_metrics_draws_both_objectives(tmp_path):
    pytest.importorskip("matplotlib")  # absent on a bare GPU image (make image-check)
    path = tmp_path / "m.jsonl"
    with open(path, "w") as f:
        for step in range(1, 41):
            rec = {"step": step, "tokens": 100 * step, "ar_loss": 5 - step / 10, "md_loss": 6 - step / 12}
            if step % 10 == 0:
                rec.update(val_ar_loss=5 - step / 11, val_md_loss=6 - step / 13)
            f.write(json.dumps(rec) + "\n")
    png = plot_metrics(path, tmp_path / "out" / "loss.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="no metrics"):
        (tmp_path / "e.jsonl").write_text("")
        plot_metrics(tmp_path / "e.jsonl", tmp_path / "e.png")


def test_wandb_and_tensorboard_sinks_send_numeric_metrics(tmp_path, monkeypatch):
    import sys
    import types

    from megatron_dual.logging import TensorBoardSink, WandbSink

    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("wandb", step, metrics))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["project"], kw["mode"], kw["resume"])) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink("proj", "offline", tmp_path, {"a": 1})
    sink.log(3, {"ar_loss": 2.5, "note": "text", "ok": True})
    sink.close()
    assert calls == [("init", "proj", "offline", "allow"), ("wandb", 3, {"ar_loss": 2.5}), ("finish",)]

    class Writer:
        def __init__(self, directory, purge_step=None):
            calls.append(("tb", directory, purge_step))

        def add_scalar(self, k, v, step):
            calls.append(("scalar", k, v, step))

        def close(self):
            calls.append(("tb-close",))

    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    calls.clear()
    sink = TensorBoardSink(tmp_path / "tb", resume_step=4)
    sink.log(5, {"md_loss": 1.5, "s": "x"})
    sink.close()
    assert calls == [("tb", str(tmp_path / "tb"), 5), ("scalar", "md_loss", 1.5, 5), ("tb-close",)]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    from megatron_dual.config import ConfigError

    with pytest.raises(ConfigError, match=r"wandb is not installed: pip install 'megatron-dual\[wandb\]'"):
        WandbSink("proj")


def test_loss_plot_without_matplotlib_says_so_in_one_line_and_the_run_ends(tmp_path, monkeypatch):
    """A bare GPU image (the checkout on PYTHONPATH) may lack matplotlib: the last step's plot then costs one line,
    not the finished run."""
    import sys
    from types import SimpleNamespace as NS

    from megatron_dual.callbacks import LossPlot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "tokens": 10, "ar_loss": 5.0}) + "\n")
    said: list[str] = []
    cfg = NS(train=NS(steps=1), preset=None, logging=NS(metrics_file=None))
    cb = LossPlot()
    cb.trainer = NS(step=1, cfg=cfg, schedule=NS(alpha=0.5), out=tmp_path, say=said.append)
    cb.post_train({})
    assert len(said) == 1 and "matplotlib is not installed" in said[0] and str(metrics) in said[0], said
    assert not (tmp_path / "loss.png").exists()
    with pytest.raises(ModuleNotFoundError, match=r"^matplotlib is not installed \(pip install matplotlib\)$"):
        plot_metrics(metrics, tmp_path / "loss.png")


def test_model_line_counts_the_whole_model_not_this_ranks_shard(capsys):
    """Under TP 2 the start-up line showed half the parameters, under ZeRO-3 0.00M: it counted this rank's copy."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from megatron_dual.callbacks.monitoring import ProgressDisplay
    from megatron_dual.config import load_config
    from megatron_dual.model.transformer import DualTransformer, param_counts
    from megatron_dual.parallel.state import ParallelState

    cfg = load_config(None, [], preset="tiny")
    with torch.device("meta"):
        whole = param_counts(DualTransformer(cfg.model))["total"]
    # what a rank holds is a fraction of the model (its TP shards; under ZeRO-3 empty placeholders)
    shard = DualTransformer(dataclasses.replace(cfg.model, n_layers=1))
    tr = SimpleNamespace(
        cfg=cfg,
        step=0,
        model=shard,
        device=torch.device("cpu"),
        engine=SimpleNamespace(precision="fp32"),
        par=ParallelState(1, 0, 1, 0.75, 4),
        data=SimpleNamespace(train=[0] * 3),
        resumed_from=None,
    )
    cb = ProgressDisplay()
    cb.trainer = tr
    cb.pre_train()
    cb.close()
    assert f"model: {whole / 1e6:.2f}M parameters" in capsys.readouterr().err
