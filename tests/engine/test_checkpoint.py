import json
import random

import numpy as np
import pytest
import torch

from megatron_dual.engine import checkpoint as ckpt


def _model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.LayerNorm(width))


def _optim(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return {"adamw": opt}, {"adamw": sch}


def _train_one(model, opts, schs):
    model(torch.randn(3, model[0].in_features)).square().sum().backward()
    for o in opts.values():
        o.step()
    for s in schs.values():
        s.step()


def _save(root, step, model, opts, schs, keep_last=0):
    state = {
        "optimizers": {k: o.state_dict() for k, o in opts.items()},
        "schedulers": {k: s.state_dict() for k, s in schs.items()},
    }
    return ckpt.save_checkpoint(
        root,
        step,
        model,
        state,
        {"step": step, "sampler": {"consumed": step}},
        {"model": {"width": model[0].in_features}},
        keep_last=keep_last,
    )


def test_save_load_round_trip_restores_everything(tmp_path):
    model = _model()
    opts, schs = _optim(model)
    _train_one(model, opts, schs)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    path = _save(tmp_path, 1, model, opts, schs)
    expect = (torch.rand(3), np.random.rand(3), random.random())

    fresh = _model()
    fresh[0].weight.data.zero_()
    f_opts, f_schs = _optim(fresh)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    meta = ckpt.load_checkpoint(path, fresh, f_opts, f_schs)
    ckpt.restore_rng_state(meta["rng"])
    assert meta["step"] == 1 and meta["trainer_state"]["sampler"] == {"consumed": 1}
    assert torch.equal(torch.rand(3), expect[0])
    assert np.array_equal(np.random.rand(3), expect[1]) and random.random() == expect[2]
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    # the next step after loading equals the next step of the original
    x = torch.randn(3, 8)
    for m, o, s in ((model, opts, schs), (fresh, f_opts, f_schs)):
        m.zero_grad()
        m(x).square().sum().backward()
        o["adamw"].step()
        s["adamw"].step()
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert f_schs["adamw"].last_epoch == schs["adamw"].last_epoch == 2


def test_keep_last_latest_and_incomplete_directories(tmp_path):
    model = _model()
    opts, schs = _optim(model)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opts, schs, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    # a killed save: a tmp dir and a step dir without meta.json are never taken for checkpoints
    (tmp_path / ".tmp_step_00000005_1").mkdir()
    (tmp_path / "step_00000006").mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path).name == "step_00000004"
    assert ckpt.resolve_resume("auto", tmp_path).name == "step_00000004"
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume(str(tmp_path / "step_00000003"), tmp_path).name == "step_00000003"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step_00000004"
    _save(tmp_path, 7, model, opts, schs, keep_last=2)
    assert not (tmp_path / ".tmp_step_00000005_1").exists()  # cleaned by the next save
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None


def test_resume_errors_name_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "empty"), tmp_path)
    (tmp_path / "config.yaml").write_text("preset: tiny\n")
    with pytest.raises(ckpt.CheckpointError, match="config.yaml is a file, not a checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "config.yaml"), tmp_path)


def test_corrupt_files_are_reported_with_their_name(tmp_path):
    model = _model()
    opts, schs = _optim(model)
    path = _save(tmp_path, 1, model, opts, schs)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is corrupt or truncated"):
        ckpt.load_checkpoint(path, _model(), *_optim(_model()))
    weights.write_bytes(data)
    optim = path / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="optim.pt is corrupt or truncated"):
        ckpt.load_checkpoint(path, _model(), *_optim(_model()))
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="meta.json is corrupt"):
        ckpt.load_checkpoint(path, _model())


@pytest.mark.parametrize("name", ["optim.pt", "rng.pt"])
def test_a_file_torch_cannot_unpickle_is_one_line(tmp_path, name):
    model = _model()
    path = _save(tmp_path, 1, model, *_optim(model))
    (path / name).write_bytes(b"x\n")  # torch.load's weights_only error runs over several lines
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path, _model(), *_optim(_model()))
    assert f"{name} is corrupt or truncated: Unsupported operand" in str(e.value)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_another_model_is_refused_naming_the_tensor(tmp_path):
    small = _model(8)
    path = _save(tmp_path, 1, small, *_optim(small))
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        ckpt.load_model_weights(path, _model(16), model_config={"width": 16})
    msg = str(e.value)
    assert "'0.weight'" in msg and "(8, 8)" in msg and "(16, 16)" in msg
    assert "model.width: checkpoint 8 vs config 16" in msg
    other = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ckpt.CheckpointMismatchError, match="'1.bias'.*lacks"):
        ckpt.load_model_weights(path, other)
    ckpt.load_model_weights(path, other, strict=False)
    assert torch.equal(other[0].weight, small[0].weight)


def test_meta_json_is_written_last_and_is_plain_json(tmp_path):
    model = _model()
    path = _save(tmp_path, 12, model, *_optim(model))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == ckpt.FORMAT and meta["step"] == 12
    assert meta["tensors"]["0.weight"] == [8, 8]
    # every torch file is loadable without unpickling arbitrary objects
    torch.load(path / "optim.pt", weights_only=True)
    torch.load(path / "rng.pt", weights_only=True)
