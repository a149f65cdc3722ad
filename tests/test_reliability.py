"""Fault injection (issue 15): deterministic kill points, divergence, preemption, stalled ranks, bad inputs.

A "kill" at a point is simulated in-process by copying the run directory at that point (what ``kill -9`` would leave
on disk) and aborting; the copy is then resumed and compared with an uninterrupted run, float for float.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import VOCAB, tiny_overrides, write_structured_corpus

from megatron_dual import logging as md_logging
from megatron_dual.callbacks import Callback
from megatron_dual.config import ConfigError, load_config
from megatron_dual.data import dataloader
from megatron_dual.data.indexed import IndexedDatasetWriter
from megatron_dual.data.tokenizer import LTG_TOKENIZER_PATH
from megatron_dual.engine import checkpoint as ckpt
from megatron_dual.parallel.testing import free_port
from megatron_dual.train import main
from megatron_dual.trainer import Trainer, TrainingDivergedError

ROOT = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """Stands for kill -9 at a kill point (a BaseException: no `except Exception` may swallow it)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_structured_corpus(str(tmp_path_factory.mktemp("rel_corpus") / "toy_text_document"))


overrides = tiny_overrides


def tiny(corpus, out, *extra):
    return load_config(overrides=overrides(corpus, out, *extra))


def cli(corpus, out, *extra):
    args = ["--quiet"]
    for item in overrides(corpus, out, *extra):
        args += ["--set", item]
    return main(args)


def losses(out):
    keep = ("step", "loss", "ar_loss", "md_loss", "grad_norm", "lr", "val_ar_loss", "val_md_loss")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted 6-step run: its directory, metrics and final parameters."""
    out = tmp_path_factory.mktemp("rel_ref") / "run"
    tr = Trainer(tiny(corpus, out), quiet=True)
    tr.fit()
    return out, losses(out), params(tr.model)


def assert_same_run(out, reference, model):
    _, ref_losses, ref_params = reference
    assert losses(out) == ref_losses  # every float exactly
    for name, p in ref_params.items():
        assert torch.equal(dict(model.named_parameters())[name], p), name


def resume_to_end(corpus, out):
    tr = Trainer(tiny(corpus, out), quiet=True)
    tr.fit()
    return tr


def snapshot_and_kill(out, snap):
    shutil.copytree(out, snap)
    raise Killed()


# ------------------------------------------------------------------------------------------- 1. divergence handler
def poison_step(monkeypatch, at_step):
    """NaN losses in step ``at_step`` only (the failure is transient: a resumed run trains it normally)."""
    real = Trainer.forward_loss

    def poisoned(self, batch):
        out = real(self, batch)
        if self.step + 1 == at_step:
            out.weighted = out.weighted * float("nan")
        return out

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)


def test_divergence_saves_the_state_before_the_failed_step(corpus, tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    tr = Trainer(tiny(corpus, out), quiet=True)
    poison_step(monkeypatch, 5)
    with pytest.raises(TrainingDivergedError) as e:
        tr.fit()
    msg = str(e.value)
    assert "step 5" in msg and "step_00000004" in msg and "None" not in msg
    meta = ckpt.read_meta(out / "checkpoints" / "step_00000004")
    assert meta["trainer_state"]["sampler"]["consumed_samples"] == 4 * tr.loader.samples_per_step
    monkeypatch.undo()
    resumed = resume_to_end(corpus, out)
    assert_same_run(out, reference, resumed.model)


def test_divergence_after_a_periodic_save_points_to_it_and_leaves_it_untouched(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = Trainer(tiny(corpus, out), quiet=True)
    tr.fit(max_steps=3)
    step3 = out / "checkpoints" / "step_00000003"
    before = {p.name: p.stat().st_ino for p in [step3, *step3.iterdir()]}
    poison_step(monkeypatch, 4)
    with pytest.raises(TrainingDivergedError, match="saved in .*step_00000003"):
        tr.fit()
    assert {p.name: p.stat().st_ino for p in [step3, *step3.iterdir()]} == before
    assert not list((out / "checkpoints").glob(".tmp_*"))


def test_divergence_without_any_good_state_says_how_to_start_afresh(corpus, tmp_path):
    tr = Trainer(tiny(corpus, tmp_path / "run"), quiet=True)
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDivergedError) as e:
        tr.fit()
    assert "None" not in str(e.value) and "--resume restart" in str(e.value)


# ------------------------------------------------------------------------------------------------ 4. kill points
def test_kill_inside_the_checkpoint_writer_resumes_bit_exactly(corpus, tmp_path, monkeypatch, reference):
    """Killed after step 6's model.safetensors is written, before its optimizer state: step 3 is the last
    complete checkpoint."""
    out, snap = tmp_path / "run", tmp_path / "snap"
    real = ckpt.save_file

    def save_then_kill(state, path, metadata=None):
        real(state, path, metadata=metadata)
        if metadata.get("step") == "6":
            snapshot_and_kill(out, snap)

    monkeypatch.setattr(ckpt, "save_file", save_then_kill)
    with pytest.raises(Killed):
        Trainer(tiny(corpus, out), quiet=True).fit()
    monkeypatch.undo()
    assert ckpt.find_latest_checkpoint(snap / "checkpoints").name == "step_00000003"
    resumed = resume_to_end(corpus, snap)
    assert_same_run(snap, reference, resumed.model)
    assert not list((snap / "checkpoints").glob(".tmp_*"))


def test_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(corpus, tmp_path, monkeypatch):
    out, snap = tmp_path / "run", tmp_path / "snap"
    real = shutil.rmtree

    def half_delete_then_kill(path, *a, **k):
        path = Path(path)
        if (path / "model.safetensors").is_file() and (path / "meta.json").is_file():
            (path / "model.safetensors").unlink()  # the kill lands in the middle of the deletion
            snapshot_and_kill(out, snap)
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", half_delete_then_kill)
    with pytest.raises(Killed):
        Trainer(tiny(corpus, out, "checkpoint.keep_last=1"), quiet=True).fit()
    monkeypatch.undo()
    found = ckpt.list_checkpoints(snap / "checkpoints")
    assert [p.name for p in found] == ["step_00000006"]
    assert all((p / "model.safetensors").is_file() for p in found)
    ckpt.clean_stale(snap / "checkpoints")
    assert not list((snap / "checkpoints").glob(".*"))


@pytest.mark.parametrize("point", ["rename", "reopen"])
def test_kill_during_the_metrics_rewrite_on_resume_loses_no_line(corpus, tmp_path, monkeypatch, reference, point):
    """Killed as the resumed run rewrites metrics.jsonl: before the rewritten file is renamed in, or as the file is
    opened to be appended to (where the old code had just truncated it)."""
    out, snap = tmp_path / "run", tmp_path / "snap"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=4)  # "killed" after step 4; last checkpoint step 3
    real_open, real_replace = open, os.replace
    metrics = str(out / "metrics.jsonl")

    def open_then_kill(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path) == metrics and mode[0] in "wa":
            f.close()
            snapshot_and_kill(out, snap)
        return f

    def kill_before_rename(src, dst):
        if str(dst) == metrics:
            snapshot_and_kill(out, snap)
        return real_replace(src, dst)

    if point == "reopen":
        monkeypatch.setattr(md_logging, "open", open_then_kill, raising=False)
    else:
        monkeypatch.setattr(os, "replace", kill_before_rename)
    with pytest.raises(Killed):
        Trainer(tiny(corpus, out), quiet=True).fit()
    monkeypatch.undo()
    assert [r["step"] for r in losses(snap)][:3] == [1, 2, 3]
    resumed = resume_to_end(corpus, snap)
    assert_same_run(snap, reference, resumed.model)


def test_disk_full_while_saving_is_one_line_and_loses_nothing(corpus, tmp_path, monkeypatch, capsys, reference):
    out = tmp_path / "run"
    real = ckpt.save_file

    def enospc(state, path, metadata=None):
        if metadata.get("step") == "6":
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(state, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", enospc)
    assert cli(corpus, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.safetensors" in err[0], err
    assert "No space left on device" in err[0] and "free space" in err[0]
    assert not list((out / "checkpoints").glob(".tmp_*"))
    monkeypatch.undo()
    resumed = resume_to_end(corpus, out)
    assert_same_run(out, reference, resumed.model)


# --------------------------------------------------------------------------------------------------- 4. durability
def test_every_checkpoint_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    model = torch.nn.Linear(4, 4)
    final = ckpt.save_checkpoint(tmp_path, 1, model, {"optimizers": {}, "schedulers": {}}, {}, {})
    tmp = str(tmp_path / ".tmp_step_00000001")
    for f in final.iterdir():
        assert f"{tmp}/{f.name}" in synced, f.name


def test_stale_temporary_files_are_cleaned_by_the_next_save(tmp_path):
    for name in (".latest.tmp123", ".tmp_step_00000002"):
        (tmp_path / name).mkdir() if "step" in name else (tmp_path / name).write_text("x")
    ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"optimizers": {}, "schedulers": {}}, {}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, capsys, reference):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    weights = out / "checkpoints" / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    tr = Trainer(tiny(corpus, out), quiet=True)
    assert tr.maybe_resume().name == "step_00000003"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "step_00000006" in err[0] and "step_00000003" in err[0]


# ---------------------------------------------------------------------------------------------- 3. run directory
def test_fresh_start_on_an_existing_run_is_refused(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=3)
    before = (out / "metrics.jsonl").read_text()
    assert cli(corpus, out, "checkpoint.resume=none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume auto" in err[0] and "--resume restart" in err[0]
    assert (out / "metrics.jsonl").read_text() == before


def test_resuming_another_runs_checkpoint_onto_a_run_is_refused(corpus, tmp_path, capsys):
    """It would overwrite the run's later checkpoints and rewrite its metrics. Rolling back within the run, a checkpoint
    from elsewhere that is not behind the run (a converted copy of its latest, as the engines advise), or another
    run's checkpoint into an empty output_dir, are allowed."""
    from megatron_dual import run_dir

    a, b = tmp_path / "a", tmp_path / "b"
    Trainer(tiny(corpus, a), quiet=True).fit(max_steps=3)
    Trainer(tiny(corpus, b, "checkpoint.interval=2"), quiet=True).fit(max_steps=4)
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert cli(corpus, b, f"checkpoint.resume={a}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(step 3) is not one of this run's checkpoints" in err[0], err
    assert "up to step_00000004" in err[0] and "--resume auto" in err[0]
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
    own = ckpt.list_checkpoints(b / "checkpoints")
    assert [p.name for p in own] == ["step_00000002", "step_00000004"]
    run_dir.refuse_foreign_resume(b, b / "checkpoints", own[0], 2, own[1:])  # rolling back: allowed
    copy = tmp_path / "converted" / "step_00000004"
    shutil.copytree(own[-1], copy)
    run_dir.refuse_foreign_resume(b, b / "checkpoints", copy, 4, [])  # nothing later: allowed
    run_dir.refuse_foreign_resume(tmp_path / "c", tmp_path / "c" / "checkpoints", copy, 4, [])  # no run there


def test_restart_moves_the_old_run_aside(corpus, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=4)
    old_metrics = (out / "metrics.jsonl").read_text()
    Trainer(
        tiny(
            corpus, out, "checkpoint.resume=restart", "train.steps=2", "schedule.decay_steps=1", "checkpoint.interval=1"
        ),
        quiet=True,
    ).fit()
    (previous,) = (out / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == old_metrics
    assert [p.name for p in ckpt.list_checkpoints(previous / "checkpoints")] == ["step_00000003"]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in losses(out)] == [1, 2]


# ------------------------------------------------------------------------------------------------- 5. preemption
class SignalAt(Callback):
    """Sends ``signals`` to this process before step ``step`` (from train.callbacks: configured by environment)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = int(os.environ["REL_SIGNAL_STEP"])
        self.signals = [getattr(signal, s) for s in os.environ["REL_SIGNALS"].split(",")]

    def pre_step(self, step):
        if step == self.step:
            for s in self.signals:
                os.kill(os.getpid(), s)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_saves_at_the_end_of_the_step_and_exits_0(corpus, tmp_path, monkeypatch, capsys, reference, sig):
    out = tmp_path / "run"
    handler = signal.getsignal(getattr(signal, sig))
    monkeypatch.setenv("REL_SIGNAL_STEP", "5")
    monkeypatch.setenv("REL_SIGNALS", sig)
    assert cli(corpus, out, "train.callbacks=[test_reliability:SignalAt]") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by") and "after step 5" in lines[0], lines
    assert ckpt.find_latest_checkpoint(out / "checkpoints").name == "step_00000005"
    assert signal.getsignal(getattr(signal, sig)) == handler  # the previous handler is back
    if sig == "SIGTERM":
        resumed = resume_to_end(corpus, out)
        assert_same_run(out, reference, resumed.model)


def test_second_ctrl_c_aborts_with_one_line(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REL_SIGNAL_STEP", "2")
    monkeypatch.setenv("REL_SIGNALS", "SIGINT,SIGINT")
    assert cli(corpus, tmp_path / "run", "train.callbacks=[test_reliability:SignalAt]") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "second Ctrl-C" in err[0]


# ------------------------------------------------------------------------ 5./6. several ranks: agreement, stalls
def launch_two_ranks(corpus, out, tmp_path, behaviour, *extra, wait=120):
    """Two gloo ranks of ``python -m megatron_dual.train``; rank 1 does ``behaviour`` before step 2. Returns
    (rank 0's exit code, its stderr, rank 1's process)."""
    (tmp_path / "rel_hooks.py").write_text(
        textwrap.dedent(f"""
        import os, signal, time
        from megatron_dual.callbacks import Callback
        class Rank1(Callback):
            def pre_step(self, step):
                if step == 2 and os.environ["RANK"] == "1":
                    {behaviour}
    """)
    )
    port = free_port()
    args = [sys.executable, "-m", "megatron_dual.train", "--quiet"]
    for item in overrides(
        corpus, out, "train.grad_accum=2", "train.callbacks=[rel_hooks:Rank1]", "train.threads=1", *extra
    ):
        args += ["--set", item]
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
        )
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out0, err0 = procs[0].communicate(timeout=wait)
    finally:
        procs[0].kill()
    return procs[0].returncode, out0, err0, procs[1]


def test_two_ranks_stop_together_when_one_gets_sigterm(corpus, tmp_path):
    rc, out0, err0, rank1 = launch_two_ranks(corpus, tmp_path / "run", tmp_path, "os.kill(os.getpid(), signal.SIGTERM)")
    assert rank1.wait(timeout=60) == 0 and rc == 0, err0
    assert out0.strip().startswith("stopped by a stop request on another rank after step 2"), out0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]


@pytest.mark.parametrize("behaviour", ["os.kill(os.getpid(), signal.SIGSTOP)", "os._exit(3)"], ids=["stopped", "died"])
def test_a_stalled_or_dead_peer_ends_the_job_with_one_line(corpus, tmp_path, behaviour):
    t0 = time.monotonic()
    rc, _, err0, rank1 = launch_two_ranks(corpus, tmp_path / "run", tmp_path, behaviour, "parallel.timeout=2")
    try:
        lines = [line for line in err0.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err0, err0
        assert lines[0].startswith("error: rank 0 of 2") and "token counts all-reduce" in lines[0], lines
        if "SIGSTOP" in behaviour:
            assert "timed out after 2 s (parallel.timeout)" in lines[0]
        else:
            assert "lost a peer" in lines[0] or "timed out" in lines[0]
        assert time.monotonic() - t0 < 90
    finally:
        rank1.kill()
        rank1.wait()


# ---------------------------------------------------------------------------------------------- 7. data checks
def test_out_of_range_token_anywhere_is_refused_at_start_up(tmp_path):
    prefix = str(tmp_path / "bad_text_document")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for i in range(100):
            w.add_document([1] + [20] * 30 + ([VOCAB + 5] if i == 90 else []))
    with pytest.raises(
        ConfigError,
        match=rf"model.vocab_size = {VOCAB} but .*bad_text_document holds token id "
        rf"{VOCAB + 5}",
    ):
        Trainer(tiny(prefix, tmp_path / "run"), quiet=True)
    (cached,) = (tmp_path / "bad_text_document_cache").glob("token_range_*.json")
    assert json.loads(cached.read_text())["range"] == [0, VOCAB + 5]
    cached.write_text(json.dumps({"range": [0, 7]}))  # the cache is what a second start-up reads
    assert dataloader.token_id_range(prefix, str(tmp_path / "bad_text_document_cache")) == (0, 7)


def test_tokenizer_larger_than_the_model_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match=rf"data.tokenizer = .* has 51200 tokens but model.vocab_size = {VOCAB}"):
        Trainer(tiny(corpus, tmp_path / "run", f"data.tokenizer={LTG_TOKENIZER_PATH}"), quiet=True)


# ------------------------------------------------------------------------------------------ 8. errors, not tracebacks
def test_dev_full_as_metrics_file_is_refused_before_any_work(corpus, tmp_path, capsys):
    assert cli(corpus, tmp_path / "run", "logging.metrics_file=/dev/full") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logging.metrics_file = '/dev/full'" in err[0] and "full device" in err[0], err
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: chmod when not root, else a read-only tmpfs (skipped where neither
    works)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("root without permission to mount a read-only tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("field", ["output_dir", "checkpoint.dir"])
def test_read_only_directory_is_refused_before_any_work(corpus, tmp_path, capsys, read_only_dir, field):
    out = read_only_dir / "run" if field == "output_dir" else tmp_path / "run"
    extra = [f"checkpoint.dir={read_only_dir / 'ckpt'}"] if field == "checkpoint.dir" else []
    assert cli(corpus, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field} = ") and "writable" in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cuda_without_a_gpu_is_one_line(corpus, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli(corpus, tmp_path / "run", "train.device=cuda") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.device = 'cuda'" in err[0] and "no CUDA device" in err[0]


# ------------------------------------------------------------------------------------------------------ 10. misc
def test_failed_resume_keeps_config_yaml(corpus, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(corpus, out), quiet=True).fit(max_steps=3)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ckpt.CheckpointMismatchError):
        Trainer(tiny(corpus, out, "model.hidden_size=64"), quiet=True).fit()
    assert (out / "config.yaml").read_text() == before


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_non_finite_lr_is_refused(corpus, tmp_path, value):
    with pytest.raises(ConfigError, match="optimizer.lr = .* positive finite"):
        tiny(corpus, tmp_path, f"optimizer.lr={value}")


def test_generate_on_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    import json as _json

    from megatron_dual.cli import main as cli_main

    step = tmp_path / "ckpts" / "step_00000001"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    cfg = {
        "model": {
            "n_layers": 1,
            "hidden_size": 32,
            "n_heads": 2,
            "intermediate_size": 48,
            "vocab_size": 51200,
            "max_seq_len": 32,
        },
        "data": {"tokenizer": "ltg", "seq_len": 16},
    }
    (step / "meta.json").write_text(_json.dumps({"step": 1, "trainer_state": {}, "config": cfg}))
    assert cli_main(["generate", "--checkpoint", str(step), "--prompt", "Hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "model.safetensors" in err[0]
