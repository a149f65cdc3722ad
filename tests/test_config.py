import pytest

from megatron_dual.config import PRESETS, ConfigError, load_config, parse_overrides


def test_presets_validate():
    for name in PRESETS:
        cfg = load_config(preset=name)
        assert cfg.preset == name


def test_dual_470m_is_the_reference():
    m = load_config(preset="dual-470m").model
    assert (m.n_layers, m.hidden_size, m.n_heads, m.dim_head, m.intermediate_size) == (24, 1024, 16, 64, 3554)
    assert (m.vocab_size, m.max_seq_len, m.rope_theta, m.norm_eps) == (51200, 2048, 160_000.0, 1e-7)
    cfg = load_config(preset="dual-470m")
    assert cfg.objective.alpha == 63 / 64 and cfg.objective.z_loss == 1e-4
    assert cfg.optimizer.name == "muon" and cfg.optimizer.lr == 0.007 and cfg.optimizer.weight_decay == 0.1
    assert (cfg.schedule.name, cfg.schedule.warmup_steps, cfg.schedule.decay_steps, cfg.train.steps) == (
        "wsd", 0, 2048, 8192)
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


def test_parse_overrides_shape():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["model.n_layers"])
