"""benchmarks/zero_memory.py: exact parameter counts from the meta device, and the per-rank states fall by stage as
ZeRO says (optimizer states / DP at 1, + gradients at 2, + parameters at 3)."""

import importlib.util
from pathlib import Path

import pytest

from megatron_dual.config import load_config
from megatron_dual.model.transformer import DualTransformer, param_counts

spec = importlib.util.spec_from_file_location(
    "zero_memory", Path(__file__).resolve().parents[2] / "benchmarks" / "zero_memory.py"
)
zm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(zm)


def test_counts_are_the_models_and_stages_shrink_as_zero_says():
    import torch

    s = zm.param_split("dual-1b", tp=1)
    with torch.device("meta"):
        model = DualTransformer(load_config(preset="dual-1b", overrides=["data.path=x"]).model)
    assert s["muon"] + s["adamw"] == param_counts(model)["total"]
    dp = 8
    ddp = zm.states(s, "ddp", 0, dp)
    z = [zm.states(s, "deepspeed", k, dp) for k in range(4)]
    total = s["muon"] + s["adamw"]
    assert ddp[:3] == (4 * total, 4 * total, 4 * s["muon"] + 8 * s["adamw"])
    assert z[1][2] == pytest.approx(z[0][2] / dp) and z[1][1] == z[0][1]
    assert z[2][1] == pytest.approx(z[0][1] / dp) and z[2][0] == z[0][0]
    assert z[3][0] == pytest.approx(z[0][0] / dp)
    assert zm.activations(s, "full", 1) < zm.activations(s, "selective", 1) < zm.activations(s, "none", 1)
    assert zm.param_split("dual-1b", tp=2)["muon"] == pytest.approx(s["muon"] / 2)


@pytest.mark.parametrize("args", [["--dp", "0"], ["--dp", "-8"], ["--tp", "0"], ["--dp", "x"]])
def test_a_size_below_one_is_an_argument_error_not_a_traceback(args, capsys):
    with pytest.raises(SystemExit) as e:  # --dp 0 raised ZeroDivisionError
        zm.main(["--presets", "tiny", *args])
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--world", "-2"], ["--world", "8", "0"], ["--slots", "0"], ["--micro-batch", "x"]])
def test_parallel_benchmark_sizes_below_one_are_refused(args, capsys):
    """benchmarks/parallel.py --world -2 printed an empty table and exited 0."""
    spec = importlib.util.spec_from_file_location(
        "parallel_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "parallel.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--no-measure"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and err.endswith(("must be >= 1", "is not an integer")) and "Traceback" not in err
