"""``benchmarks/optimizer.py --smoke``: Muon per block vs batched, AdamW loop vs foreach vs fused, grad norm loop vs
foreach run on CPU at tiny shapes and agree (foreach AdamW and the loop norm bit for bit, the rest to fp32
rounding)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "optimizer.py"


def test_smoke_runs_every_measurement_and_the_paths_agree(capsys):
    spec = importlib.util.spec_from_file_location("bench_optimizer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        fields = dict(item.split("=", 1) for item in line.split())
        rows[fields.pop("name")] = fields
    assert set(rows) == {"muon", "adamw", "grad_norm"}
    assert int(rows["muon"]["blocks"]) == 15  # 2 x (q, k, v, out, up, gate, down) + the head projection
    assert 0 < float(rows["muon"]["max_rel_err"]) < 1e-4
    assert float(rows["adamw"]["max_rel_err_foreach"]) == 0 and float(rows["adamw"]["max_rel_err_fused"]) < 1e-5
    assert rows["adamw"]["default"] == "foreach"
    assert float(rows["grad_norm"]["rel_diff"]) < 1e-6
    assert all(float(r[k]) > 0 for r in rows.values() for k in r if k.endswith("_ms"))
