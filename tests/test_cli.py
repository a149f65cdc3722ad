import json

from megatron_dual.cli import main


def test_info_dual_470m(capsys):
    assert main(["info", "--preset", "dual-470m", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_total"] == 468_700_160
    assert info["params_per_layer"] == 15_114_240
    assert info["layers"] == 24 and info["vocab"] == 51200
    # ~6N FLOPs per token plus attention: 6 * 468.7M = 2.81 GFLOP; causal attention adds, the embedding lookup not
    assert 2.5e9 < info["train_flops_per_token_causal"] < info["train_flops_per_token_bidirectional"] < 3.5e9


def test_info_text_and_bad_override(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "non-embedding" in out and "FLOPs/token" in out
    assert main(["info", "--preset", "tiny", "--set", "model.n_heads=3"]) == 2
    assert "model.hidden_size = 128" in capsys.readouterr().err


def test_example_configs_validate():
    from pathlib import Path

    from megatron_dual.config import load_config

    for f in sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")):
        load_config(f)


def test_a_missing_package_is_a_one_line_error(monkeypatch, capsys):
    """The checkout run from PYTHONPATH on an image without one of its packages: rc 2 and one line naming it."""
    import megatron_dual.cli as cli

    def needs_sklearn(args):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(cli, "cmd_info", needs_sklearn)
    assert main(["info", "--preset", "dual-470m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: No module named 'sklearn' (pip install -e . installs what megatron-dual needs)"


def test_train_with_a_missing_package_is_one_line(monkeypatch, capsys):
    """`megatron-dual train` / torchrun on megatron_dual/train.py: a missing package is one 'error:' line, rc 2."""
    import megatron_dual.train as train_mod

    def needs_zstandard(cfg, quiet=False):
        raise ModuleNotFoundError("No module named 'zstandard'", name="zstandard")

    monkeypatch.setattr(train_mod, "train", needs_zstandard)
    assert train_mod.main(["--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: No module named 'zstandard' (pip install -e . installs what megatron-dual needs)"
