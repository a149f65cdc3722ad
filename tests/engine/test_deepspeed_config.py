"""Bad input for the DeepSpeed engine: each a one-line error from us, naming the field, before DeepSpeed's own.

Pure functions only (no processes, DeepSpeed not imported): the generated DeepSpeed config, the merge of a user's
JSON, the resume check, and the config fields of ``engine.*`` / ``train.activation_checkpointing``.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_dual.config import ConfigError, load_config
from megatron_dual.engine.checkpoint import CheckpointError
from megatron_dual.engine.deepspeed import (
    check_resumable,
    check_stage_precision,
    deepspeed_config,
    merge_deepspeed_config,
    validation_error,
)


def _cfg(*extra):
    return load_config(preset="tiny", overrides=["train.grad_accum=4", "train.micro_batch_size=2", *extra])


def _json(tmp_path: Path, obj) -> str:
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(obj))
    return str(p)


def test_generated_config_multiplies_out_and_carries_our_fields():
    ds = deepspeed_config(_cfg("engine.zero_stage=3", "engine.reduce_bucket_mb=1"), dp=8, bf16=True)
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 2**18


def test_user_json_merges_over_ours(tmp_path):
    ours = deepspeed_config(_cfg(), dp=2, bf16=False)
    merged = merge_deepspeed_config(
        ours, _json(tmp_path, {"zero_optimization": {"overlap_comm": False}, "steps_per_print": 5}), "muon"
    )
    assert merged["zero_optimization"]["overlap_comm"] is False and merged["steps_per_print"] == 5
    legit = {"flops_profiler": {"enabled": False}, "activation_checkpointing": {}, "communication_data_type": "fp32"}
    assert merge_deepspeed_config(ours, _json(tmp_path, legit), "muon")["flops_profiler"] == {"enabled": False}
    assert merged["zero_optimization"]["stage"] == ours["zero_optimization"]["stage"]


@pytest.mark.parametrize(
    "user,field",
    [
        (
            {"train_batch_size": 100, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4},
            "train_batch_size = 100 but",
        ),
        ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps = 8 contradicts train.grad_accum"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage = 2 contradicts engine.zero_stage"),
        (
            {"zero_optimization": {"offload_param": {"device": "cpu"}}},
            "zero_optimization.offload_param needs ZeRO stage 3",
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            "offload_optimizer with optimizer.name = muon",
        ),
        ({"optimizer": {"type": "Muon"}}, "'optimizer' is set"),
        ({"fp16": {"enabled": True}}, "fp16.enabled = true is not supported"),
    ],
)
def test_user_json_errors_name_the_field(tmp_path, user, field):
    ours = deepspeed_config(_cfg(), dp=2, bf16=False)
    with pytest.raises(ConfigError, match="engine.deepspeed_config") as e:
        merge_deepspeed_config(ours, _json(tmp_path, user), "muon")
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "user,field",
    [
        ([1, 2], "the top level is an array, expected a JSON object"),  # AttributeError: 'list' has no 'get'
        ("ds.json", "the top level is a string"),
        ({"zero_optimization": 2}, "zero_optimization = 2, expected an object"),  # DeepSpeed's TypeError
        ({"bf16": True}, 'bf16 = true, expected an object, e.g. bf16: {"enabled": false}'),
        # DeepSpeed ignores keys it does not read: these sections' settings were dropped without a word
        ({"zero_optimisation": {"offload_optimizer": {}}}, "unknown key 'zero_optimisation'; did you mean 'zero_o"),
        ({"gradient_cliping": 0.5}, "unknown key 'gradient_cliping'; did you mean 'gradient_clipping'?"),
    ],
)
def test_user_json_that_is_not_an_object_where_one_is_needed_is_one_line(tmp_path, user, field):
    ours = deepspeed_config(_cfg(), dp=2, bf16=False)
    with pytest.raises(ConfigError, match="engine.deepspeed_config") as e:
        merge_deepspeed_config(ours, _json(tmp_path, user), "muon")
    assert field in str(e.value) and "\n" not in str(e.value)


def test_offload_optimizer_is_fine_with_adamw(tmp_path):
    ours = deepspeed_config(_cfg(), dp=2, bf16=False)
    merged = merge_deepspeed_config(
        ours, _json(tmp_path, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}), "adamw"
    )
    assert merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    "override,field",
    [
        ("engine.name=megatron", "engine.name"),
        ("engine.zero_stage=4", "engine.zero_stage"),
        ("engine.reduce_bucket_mb=0", "engine.reduce_bucket_mb"),
        ("train.activation_checkpointing=some", "train.activation_checkpointing"),
    ],
)
def test_engine_fields_validate(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(override)


def test_deepspeed_config_needs_the_engine(tmp_path):
    with pytest.raises(ConfigError, match="needs engine.name = deepspeed"):
        _cfg(f"engine.deepspeed_config={_json(tmp_path, {})}")


def test_deepspeed_config_path_must_exist(tmp_path):
    pytest.importorskip("deepspeed")  # the config is checked once the engine is known to be there
    with pytest.raises(ConfigError, match="engine.deepspeed_config .* no such file"):
        _cfg("engine.name=deepspeed", f"engine.deepspeed_config={tmp_path / 'missing.json'}")


def test_sequence_parallel_is_refused_with_deepspeed():
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match="parallel.sequence_parallel"):
        _cfg("engine.name=deepspeed", "parallel.sequence_parallel=true")


def test_deepspeed_missing_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="engine.name = 'deepspeed' is not allowed: DeepSpeed is not installed"):
        _cfg("engine.name=deepspeed")


@pytest.mark.parametrize(
    "saved,stage,dp,tp,what",
    [
        (
            {"zero_stage": 2, "dp": 2, "tp": 1},
            2,
            4,
            1,
            "over 2 data-parallel ranks; this run has engine.zero_stage = 2 over 4",
        ),
        ({"zero_stage": 1, "dp": 2, "tp": 1}, 3, 2, 1, "engine.zero_stage = 1"),
        ({"zero_stage": 1, "dp": 2, "tp": 2}, 1, 2, 1, "parallel.tp = 2 cannot resume"),
    ],
)
def test_zero_checkpoint_on_another_layout_is_refused(saved, stage, dp, tp, what):
    with pytest.raises(CheckpointError, match="convert") as e:
        check_resumable(Path("ck"), saved, stage, dp, tp)
    assert what in str(e.value)


def test_stage0_checkpoint_resumes_on_another_dp_size():
    check_resumable(Path("ck"), {"zero_stage": 0, "dp": 2, "tp": 1}, 0, 4, 1)  # replicated state: no error


def test_bf16_stage0_muon_is_refused_before_deepspeed():
    with pytest.raises(ConfigError, match="engine.zero_stage = 0 with bf16"):
        check_stage_precision(0, True, "muon")
    check_stage_precision(0, True, "adamw")
    check_stage_precision(1, True, "muon")
    check_stage_precision(0, False, "muon")


def test_deepspeeds_own_validation_error_is_one_line_naming_the_file_and_field():
    """DeepSpeed checks zero_optimization with pydantic: a misspelt field printed four lines without the file."""
    pydantic = pytest.importorskip("pydantic")

    class DeepSpeedZeroConfig(pydantic.BaseModel):  # DeepSpeed's class of that name forbids extra fields too
        model_config = pydantic.ConfigDict(extra="forbid")
        stage: int = 0

    with pytest.raises(pydantic.ValidationError) as e:
        DeepSpeedZeroConfig(stage=1, reduce_buket_size=5)
    line = str(validation_error(e.value, "my.json"))
    field = "zero_optimization.reduce_buket_size = 5: unknown field"
    assert line == f"engine.deepspeed_config (my.json): {field} (DeepSpeed's check)"
    assert "generated from ours" in str(validation_error(e.value, ""))
    assert validation_error(ValueError("something else"), "my.json") is None
