import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dual.config import (
    PRESETS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_model_dict,
)


def test_presets_validate():
    for name in PRESETS:
        cfg = load_config(preset=name)
        assert cfg.preset == name


def test_dual_470m_is_the_reference():
    m = load_config(preset="dual-470m").model
    assert (m.n_layers, m.hidden_size, m.n_heads, m.head_dim, m.intermediate_size) == (24, 1024, 16, 64, 3554)
    assert (m.vocab_size, m.max_seq_len, m.rope_theta, m.norm_eps) == (51200, 2048, 160_000.0, 1e-7)
    cfg = load_config(preset="dual-470m")
    assert cfg.objective.alpha == 63 / 64 and cfg.objective.z_loss == 1e-4
    assert cfg.optimizer.name == "muon" and cfg.optimizer.lr == 0.007 and cfg.optimizer.weight_decay == 0.1
    s = cfg.schedule
    assert (s.name, s.warmup_steps, s.decay_steps_for(cfg.train.steps), cfg.train.steps) == ("wsd", 0, 2048, 8192)
    assert cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.data.seq_len == 4 * 1024 * 1024


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmodel:\n  n_layers: 3\nobjective:\n  alpha: 1/2\n")
    cfg = load_config(f, ["model.n_layers=2", "train.steps=7", "schedule.decay_steps=3"])
    assert cfg.model.n_layers == 2 and cfg.objective.alpha == 0.5 and cfg.train.steps == 7
    assert cfg.model.hidden_size == 128  # from the preset


def test_fraction_alpha_override():
    assert load_config(preset="tiny", overrides=["objective.alpha=3/4"]).objective.alpha == 0.75


@pytest.mark.parametrize(
    "override, needles",
    [
        (["model.hiden_size=64"], ["model.hiden_size", "did you mean 'model.hidden_size'"]),
        (["modle.n_layers=2"], ["modle", "did you mean 'model'"]),
        (["model.hidden_size=130"], ["model.hidden_size = 130", "divisible by model.n_heads = 4"]),
        (["objective.alpha=1.5"], ["objective.alpha = 1.5", "[0, 1]"]),
        (["objective.alpha=-0.25"], ["objective.alpha = -0.25"]),
        (["model.n_layers=two"], ["model.n_layers", "'two'", "integer"]),
        (["model.n_kv_heads=3"], ["model.n_kv_heads = 3", "divisor"]),
        (["model.rope_theta=.inf"], ["model.rope_theta = inf", "positive finite"]),
        (["optimizer.name=sgd"], ["optimizer.name = 'sgd'", "muon, adamw"]),
        (["data.seq_len=4096"], ["data.seq_len = 4096", "model.max_seq_len = 128"]),
        (["train.precision=fp8"], ["train.precision"]),
    ],
)
def test_bad_fields_are_named(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=override)
    for n in needles:
        assert n in str(e.value)


def test_unrealisable_alpha_lists_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(preset="tiny", overrides=["objective.alpha=0.3"])  # tiny has 4 slots
    msg = str(e.value)
    assert "1/4 = 0.25" in msg and "2/4 = 0.5" in msg and "multiple of 10" in msg


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config(preset="tinny")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("value", ["[tiny]", "{name: tiny}"])
def test_a_preset_that_is_not_a_name_is_one_config_error(tmp_path, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"preset: {value}\n")
    with pytest.raises(ConfigError, match="preset: got .*expected a preset name"):
        load_config(cfg)


def test_a_config_directory_is_named_as_one(tmp_path):
    (tmp_path / "c.yaml").mkdir()
    with pytest.raises(ConfigError, match="c.yaml is a directory, not a YAML file"):
        load_config(tmp_path / "c.yaml")


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"preset: tiny\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not UTF-8 text \(byte 15"):
        load_config(tmp_path / "c.yaml")


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\nmodel:\n  hidden_size: [1\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(e.value)
    assert f"{tmp_path / 'c.yaml'}:4:1 is not valid YAML: expected ',' or ']'" in str(e.value)


def test_parse_overrides_shape():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["model.n_layers"])


# ---------------------------------------------------------------------------------------------------------------
# schedule.decay_steps: a fraction of train.steps, a whole number of steps, or 0


def test_decay_steps_fraction_count_or_zero():
    assert ScheduleConfig(decay_steps=0.25).decay_steps_for(8192) == 2048  # the recipe's 2,048 of 8,192
    assert ScheduleConfig(decay_steps=0.25).decay_steps_for(300) == 75  # the demo's 75 of 300, exactly as before
    assert ScheduleConfig(decay_steps=0.25).decay_steps_for(3) == 1
    assert ScheduleConfig(decay_steps=75).decay_steps_for(300) == 75
    assert ScheduleConfig(decay_steps=1).decay_steps_for(300) == 1  # an integer is a count, not the whole run
    assert ScheduleConfig(decay_steps=0).decay_steps_for(300) == 0
    for bad in (1.5, -1, -0.25):
        with pytest.raises(
            ConfigError,
            match=rf"schedule.decay_steps = {bad} is not allowed: must be 0 \(no decay\), "
            r"a fraction of train.steps in \(0, 1\)",
        ):
            ScheduleConfig(decay_steps=bad).decay_steps_for(300)


def test_presets_use_the_fraction_and_keep_their_decay():
    tiny = load_config(preset="tiny")
    assert tiny.schedule.decay_steps == 0.25 and tiny.schedule.decay_steps_for(tiny.train.steps) == 75
    for name in ("dual-470m", "dual-1b", "dual-3b", "dual-7b"):
        cfg = load_config(preset=name)
        assert cfg.schedule.decay_steps_for(cfg.train.steps) == 2048, name
    assert ScheduleConfig().decay_steps == 0.25


@pytest.mark.parametrize("preset", list(PRESETS))
def test_any_preset_runs_three_steps(preset):
    cfg = load_config(preset=preset, overrides=["train.steps=3"])  # refused before: the preset's decay was absolute
    assert cfg.train.steps == 3 and cfg.schedule.decay_steps_for(3) == 1


@pytest.mark.parametrize("value, parsed", [("1/4", 0.25), ("0.25", 0.25), ("2048", 2048), ("2048.0", 2048)])
def test_decay_steps_overrides(value, parsed):
    cfg = load_config(preset="dual-470m", overrides=[f"schedule.decay_steps={value}"])
    assert cfg.schedule.decay_steps == parsed and type(cfg.schedule.decay_steps) is type(parsed)
    assert cfg.schedule.decay_steps_for(cfg.train.steps) == 2048
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))).schedule.decay_steps == parsed


def test_warmup_plus_fractional_decay_must_fit():
    load_config(preset="tiny", overrides=["train.steps=12", "schedule.warmup_steps=9"])  # 9 + 3 = 12
    with pytest.raises(
        ConfigError,
        match=r"schedule.decay_steps = 0.25 is not allowed: warmup_steps \+ decay_steps "
        r"\(here 3 steps\) must not exceed train.steps = 12",
    ):
        load_config(preset="tiny", overrides=["train.steps=12", "schedule.warmup_steps=10"])
    with pytest.raises(
        ConfigError,
        match=r"schedule.decay_steps = 13 is not allowed: warmup_steps \+ decay_steps "
        r"must not exceed train.steps = 12",
    ):
        load_config(preset="tiny", overrides=["train.steps=12", "schedule.decay_steps=13"])
    load_config(preset="tiny", overrides=["train.steps=12", "schedule.decay_steps=13", "schedule.name=cosine"])


# ---------------------------------------------------------------------------------------------------------------
# One name each for the head dimension and the key/value heads


def test_head_fields_are_resolved_by_validation():
    cfg = load_config(preset="tiny")
    assert (cfg.model.n_kv_heads, cfg.model.head_dim) == (4, 32)
    assert (cfg.to_dict()["model"]["n_kv_heads"], cfg.to_dict()["model"]["head_dim"]) == (4, 32)
    big = load_config(preset="dual-1b").model
    assert (big.n_heads, big.n_kv_heads, big.head_dim) == (32, 8, 64)
    m = ModelConfig(hidden_size=64, n_heads=4, head_dim=8, n_kv_heads=2)
    m.validate()
    m.validate()  # idempotent; explicit values are kept
    assert (m.n_kv_heads, m.head_dim) == (2, 8)
    assert not hasattr(ModelConfig, "kv_heads") and not hasattr(ModelConfig, "dim_head")


def test_changing_a_validated_config_rederives_the_head_fields():
    cfg = load_config(preset="tiny")  # 128 / 4 heads: head_dim 32, n_kv_heads 4
    cfg.model.hidden_size, cfg.model.n_heads = 64, 2
    cfg.validate()
    assert (cfg.model.head_dim, cfg.model.n_kv_heads) == (32, 2)
    cfg.model.hidden_size = 32
    cfg.model.n_kv_heads = 1  # set by hand now: kept
    cfg.validate()
    assert (cfg.model.head_dim, cfg.model.n_kv_heads) == (16, 1)
    cfg.model.n_heads = 4
    cfg.validate()
    assert (cfg.model.head_dim, cfg.model.n_kv_heads) == (8, 1)
    assert cfg.model == ModelConfig(**cfg.to_dict()["model"])  # the bookkeeping is no field


def test_a_model_built_from_a_hand_made_config_resolves_it():
    from megatron_dual.model import DualTransformer

    cfg = ModelConfig(n_layers=1, hidden_size=32, n_heads=4, intermediate_size=40, vocab_size=97, max_seq_len=16)
    with torch.device("meta"):
        model = DualTransformer(cfg)
    assert (cfg.n_kv_heads, cfg.head_dim) == (4, 8)
    assert tuple(model.layers[0].attn.qkv.weight.shape) == ((4 + 2 * 4) * 8, 32)


def _old_tree() -> dict:
    """A config as checkpoints wrote it before the head fields were resolved (null in meta.json)."""
    tree = load_config(preset="tiny").to_dict()
    tree["model"].update(n_kv_heads=None, head_dim=None)
    return json.loads(json.dumps(tree))


def test_old_checkpoint_config_normalises_to_todays():
    old, current = _old_tree(), load_config(preset="tiny").to_dict()
    assert old["model"] != current["model"]
    assert resolve_model_dict(old["model"]) == current["model"]
    assert resolve_model_dict(current["model"]) == current["model"]
    assert config_from_dict(old).to_dict() == current
    gqa = dict(old["model"], n_kv_heads=2)
    assert resolve_model_dict(gqa)["n_kv_heads"] == 2 and resolve_model_dict(gqa)["head_dim"] == 32


def test_old_checkpoint_loads_against_todays_config(tmp_path):
    from megatron_dual.engine import checkpoint as ckpt
    from megatron_dual.model import DualTransformer

    cfg = load_config(preset="tiny", overrides=["model.n_layers=1"])
    old = _old_tree()
    old["model"]["n_layers"] = 1
    model = DualTransformer(cfg.model)
    path = ckpt.save_checkpoint(tmp_path, 3, model, {"optimizers": {}, "schedulers": {}}, {"step": 3}, old)
    current = cfg.to_dict()["model"]
    assert ckpt.load_checkpoint(path, DualTransformer(cfg.model), model_config=current)["step"] == 3
    ckpt._check_model_config(path, ckpt.read_meta(path), current, "")  # the resharding path's check
    with pytest.raises(ckpt.CheckpointMismatchError, match="from another model"):
        ckpt._check_model_config(path, ckpt.read_meta(path), dict(current, n_kv_heads=2), "")
    wider = load_config(preset="tiny", overrides=["model.n_layers=1", "model.intermediate_size=400"])
    with pytest.raises(ckpt.CheckpointMismatchError) as e:
        ckpt.load_checkpoint(path, DualTransformer(wider.model), model_config=wider.to_dict()["model"])
    assert str(e.value).endswith("config differs: model.intermediate_size: checkpoint 344 vs config 400")


# ---------------------------------------------------------------------------------------------------------------
# Each section validates itself; allowed values come from where they are defined


def _model_cfg(**kw) -> ModelConfig:
    m = ModelConfig(**kw)
    m.validate()
    return m


@pytest.mark.parametrize(
    "check, needles",
    [
        (lambda: ModelConfig(hidden_size=130, n_heads=4).validate(), ["model.hidden_size = 130", "model.n_heads = 4"]),
        (lambda: ModelConfig(head_dim=33).validate(), ["model.head_dim = 33", "even"]),
        (lambda: ModelConfig(n_kv_heads=5).validate(), ["model.n_kv_heads = 5", "divisor of model.n_heads = 16"]),
        (
            lambda: ModelConfig(attention_backend="flash2").validate(),
            ["model.attention_backend = 'flash2'", "one of auto, sdpa, triton, flash, flex"],
        ),
        (lambda: ModelConfig(fused_ops="cuda").validate(), ["model.fused_ops = 'cuda'", "auto, none, triton"]),
        (
            lambda: ObjectiveConfig(mask_token_id=64).validate(64),
            ["objective.mask_token_id = 64", "below model.vocab_size = 64"],
        ),
        (lambda: ObjectiveConfig(alpha=1.5).validate(64), ["objective.alpha = 1.5", "[0, 1]"]),
        (lambda: OptimizerConfig(name="sgd").validate(), ["optimizer.name = 'sgd'", "one of muon, adamw"]),
        (lambda: OptimizerConfig(muon_adjust_lr="x").validate(), ["one of match_rms_adamw, original"]),
        (lambda: OptimizerConfig(eps=-1.0).validate(), ["optimizer.eps = -1.0", "finite number >= 0"]),
        (lambda: OptimizerConfig(eps=float("nan")).validate(), ["optimizer.eps = nan"]),
        (lambda: ScheduleConfig(name="linear").validate(10), ["schedule.name = 'linear'", "wsd, cosine, constant"]),
        (lambda: ScheduleConfig(decay_steps=11).validate(10), ["schedule.decay_steps = 11", "train.steps = 10"]),
        (lambda: ScheduleConfig(min_lr_ratio=2.0).validate(10), ["schedule.min_lr_ratio = 2.0"]),
        (lambda: DataConfig(seq_len=256).validate(128), ["data.seq_len = 256", "model.max_seq_len = 128"]),
        (lambda: TrainConfig(precision="fp8").validate(), ["train.precision = 'fp8'", "one of auto, bf16, fp32"]),
        (lambda: TrainConfig(device="tpu").validate(), ["train.device = 'tpu'", "cuda:N"]),
        (lambda: ParallelConfig(tp=3).validate(_model_cfg(), "muon"), ["parallel.tp = 3", "model.n_heads = 16"]),
        (
            lambda: ParallelConfig(tp=4).validate(_model_cfg(n_kv_heads=2), "muon"),
            ["parallel.tp = 4", "key/value heads = 2"],
        ),
        (
            lambda: ParallelConfig(tp=2, distributed_muon=False).validate(_model_cfg(), "muon"),
            ["parallel.distributed_muon = False"],
        ),
        (lambda: ParallelConfig(backend="mpi").validate(_model_cfg(), "muon"), ["one of auto, nccl, gloo"]),
        (lambda: CheckpointConfig(interval=-1).validate(), ["checkpoint.interval = -1"]),
        (lambda: CheckpointConfig(keep_last=-1).validate(), ["checkpoint.keep_last = -1"]),
        (lambda: LoggingConfig(log_interval=-1).validate(), ["logging.log_interval = -1"]),
    ],
)
def test_each_section_validates_itself(check, needles):
    with pytest.raises(ConfigError) as e:
        check()
    for n in needles:
        assert n in str(e.value)


def test_sections_accept_their_defaults():
    m = _model_cfg()
    ObjectiveConfig().validate(m.vocab_size)
    OptimizerConfig().validate()
    ScheduleConfig().validate(TrainConfig().steps)
    DataConfig().validate(m.max_seq_len)
    TrainConfig().validate()
    ParallelConfig(tp=2).validate(m, "muon")
    CheckpointConfig().validate()
    LoggingConfig().validate()
    assert Config().validate(world_size=1) is not None


def test_allowed_values_come_from_their_modules(monkeypatch):
    attention = importlib.import_module("megatron_dual.model.attention")  # the package re-exports a function
    fused = importlib.import_module("megatron_dual.model.fused")
    muon = importlib.import_module("megatron_dual.optim.muon")
    schedules = importlib.import_module("megatron_dual.optim.schedules")

    monkeypatch.setattr(attention, "BACKENDS", (*attention.BACKENDS, "mine"))
    monkeypatch.setattr(fused, "FUSED_OPS", (*fused.FUSED_OPS, "mine"))
    monkeypatch.setattr(muon, "OPTIMIZERS", (*muon.OPTIMIZERS, "mine"))
    monkeypatch.setattr(schedules, "SCHEDULES", (*schedules.SCHEDULES, "mine"))
    ModelConfig(attention_backend="mine", fused_ops="mine").validate()
    OptimizerConfig(name="mine").validate()
    ScheduleConfig(name="mine").validate(10)


def test_importing_the_config_stays_light():
    code = "import sys, megatron_dual.config; assert 'torch' not in sys.modules, 'config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_values_are_read_without_yaml_1_1_surprises(tmp_path):
    """YAML 1.1 (PyYAML's default) read ``5:1`` as the base-60 number 301, ``0123`` as octal 83, ``on`` as true and
    ``2026-12-07`` as a date; those stay text now, which a number field still reads (``0100`` as 100, ``1e-3`` as
    0.001) and a text field keeps as written (``09``, ``1e3``); yes/no/on/off still work for bool fields, in --set
    and in config files alike."""
    from megatron_dual.config import parse_overrides

    tree = parse_overrides(["a.b=5:1", "a.c=0123", "a.d=2026-12-07", "a.e=1e-3", "a.f=1_000", "a.g=0x10", "a.h=on"])
    assert tree["a"] == {"b": "5:1", "c": "0123", "d": "2026-12-07", "e": "1e-3", "f": 1000, "g": 16, "h": "on"}
    assert parse_overrides(["a.b=._", "a.c=.5", "a.d=-.5e3"])["a"] == {"b": "._", "c": 0.5, "d": -500.0}
    cfg = load_config(preset="tiny", overrides=["optimizer.lr=1e-3", "logging.wandb_project=09", "data.path=1e3"])
    assert (cfg.optimizer.lr, cfg.logging.wandb_project, cfg.data.path) == (0.001, "09", "1e3")
    with pytest.raises(ConfigError, match=r"^objective.alpha_schedule = '5:1': item 1 \('5:1'\)"):
        load_config(preset="tiny", overrides=["objective.alpha_schedule=5:1"])
    (tmp_path / "c.yaml").write_text(
        "preset: tiny\ntrain: {steps: 0100}\nlogging: {tensorboard: on}\nobjective: {rotate: no}\n"
    )
    cfg = load_config(str(tmp_path / "c.yaml"))
    assert (cfg.train.steps, cfg.logging.tensorboard, cfg.objective.rotate) == (100, True, "none")


def test_a_written_config_reads_back_the_same(tmp_path):
    """The run's config.yaml (and a sweep's task configs) are written by dump_yaml, which quotes strings that either
    YAML 1.2 (``1e3``, ``09``, ``0o17``) or 1.1 (``yes``) would read as something else: yaml.safe_dump left the first
    kind bare, and the config read back data.path = '1000.0'."""
    import yaml

    from megatron_dual.config import dump_yaml

    strings = ["logging.wandb_project='09'", "data.path='1e3'", "output_dir='yes'", "data.tokenizer='0o17'"]
    cfg = load_config(preset="tiny", overrides=strings)
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg.to_dict()))
    assert load_config(str(tmp_path / "config.yaml")).to_dict() == cfg.to_dict()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.to_dict()  # a YAML 1.1 reader agrees
