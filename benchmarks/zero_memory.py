"""Memory per rank by engine and ZeRO stage for dual-1b / dual-3b / dual-7b, computed (CPU, no GPU needed).

The models are built on the meta device (no memory), so the parameter counts are exact, split as the optimizers
split them: Muon for 2-D trunk matrices, AdamW for embeddings, norms and the head; TP-sharded tensors divided by
``--tp``. Bytes per parameter, the model of the ZeRO paper (Rajbhandari et al. 2020) with our optimizers:

* DDP engine (fp32 parameters, bf16 autocast): parameters 4, gradients 4, optimizer 4 (Muon momentum) or 8 (AdamW
  m, v), all replicated over DP.
* DeepSpeed (bf16 parameters, fp32 master weights): parameters 2, gradients 2, optimizer K = 8 (Muon: master +
  momentum) or 12 (AdamW: master + m + v). ZeRO-1 divides the optimizer states by the DP size, ZeRO-2 also the
  gradients, ZeRO-3 also the parameters.
* Muon step transient (ZeRO >= 1): our Muon rebuilds whole matrices in batches of ``engine.allgather_bucket_mb``
  (at least one matrix: the largest, fp32, twice: update and result) plus a partition-sized fp32 update.
* Activations of one micro-batch slot (the preset's micro-batch x sequence, bf16): per layer and token, the tensors
  backward keeps: ``2 * (6 h + (Hq + 2 Hkv) d + 3 I)`` bytes (norm inputs/outputs, q/k/v, attention output,
  residuals, the SwiGLU's [up; gate] and product); attention by a flash-style kernel (no T^2 scores). ``full``
  keeps each block's input (2 h) plus one block recomputed; ``selective`` drops the MLP's 3 I. The head runs on
  labelled rows only, chunked: not counted. Fragmentation, communication buffers and the CUDA context are not
  counted either: treat the totals as lower bounds.

    python benchmarks/zero_memory.py                 # dual-1b/3b/7b, DP 8 and 64, TP 1
    python benchmarks/zero_memory.py --presets dual-7b --dp 32 --tp 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_dual.config import load_config, positive_int  # noqa: E402
from megatron_dual.model.transformer import DualTransformer  # noqa: E402
from megatron_dual.parallel.layers import sharding_of  # noqa: E402

GIB = 2**30


def param_split(preset: str, tp: int) -> dict[str, float]:
    """Parameters per TP rank: Muon's share, AdamW's share, the largest Muon matrix, and the model's shape."""
    cfg = load_config(preset=preset, overrides=["data.path=x"])
    with torch.device("meta"):
        model = DualTransformer(cfg.model)
    muon = adamw = largest = 0.0
    for name, p in model.named_parameters():
        n = p.numel() / (tp if sharding_of(name, cfg.model) is not None else 1)
        if model.is_trunk_matrix(name, p):
            muon += n
            largest = max(largest, p.numel())
        else:
            adamw += n
    m = cfg.model
    return {
        "muon": muon,
        "adamw": adamw,
        "largest": largest,
        "h": m.hidden_size,
        "layers": m.n_layers,
        "qkv": (m.n_heads + 2 * m.n_kv_heads) * m.head_dim,
        "inter": m.intermediate_size,
        "tokens": cfg.train.micro_batch_size * cfg.data.seq_len,
    }


def states(s: dict[str, float], engine: str, stage: int, dp: int) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, Muon step transient) in bytes per rank."""
    total = s["muon"] + s["adamw"]
    if engine == "ddp":
        return 4 * total, 4 * total, 4 * s["muon"] + 8 * s["adamw"], 0.0
    opt = 8 * s["muon"] + 12 * s["adamw"]
    params, grads = 2 * total, 2 * total
    if stage >= 1:
        opt /= dp
    if stage >= 2:
        grads /= dp
    if stage >= 3:
        params /= dp
    transient = 2 * 4 * s["largest"] + 4 * s["muon"] / dp if stage >= 1 else 0.0
    return params, grads, opt, transient


def activations(s: dict[str, float], mode: str, tp: int) -> float:
    """Bytes of the activations backward keeps for one micro-batch slot."""
    h, inter, qkv, layers, tokens = s["h"], s["inter"] / tp, s["qkv"] / tp, s["layers"], s["tokens"]
    block = 2 * (6 * h + qkv + 3 * inter)
    if mode == "none":
        per_layer_token = block * layers
    elif mode == "selective":
        per_layer_token = 2 * (6 * h + qkv) * layers
    else:
        per_layer_token = 2 * h * layers + block
    return per_layer_token * tokens


ROWS = [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def table(preset: str, dp: int, tp: int) -> str:
    s = param_split(preset, tp)
    act = {m: activations(s, m, tp) / GIB for m in ("none", "selective", "full")}
    lines = [
        f"**{preset}** ({(s['muon'] + s['adamw']) * tp / 1e9:.2f}B parameters; per rank with DP {dp} x TP {tp}; "
        f"one slot of {int(s['tokens'])} tokens: activations {act['none']:.1f} GiB, selective "
        f"{act['selective']:.1f}, full {act['full']:.1f})",
        "",
        "| engine | params GiB | grads GiB | optimizer GiB | Muon step transient GiB | states total GiB "
        "| + activations (none / selective / full) GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, stage in ROWS:
        p, g, o, t = (x / GIB for x in states(s, engine, stage, dp))
        name = "DDP (fp32 params)" if engine == "ddp" else f"ZeRO-{stage} (bf16)"
        total = p + g + o + t
        lines.append(
            f"| {name} | {p:.1f} | {g:.1f} | {o:.1f} | {t:.1f} | {total:.1f} | "
            f"{total + act['none']:.1f} / {total + act['selective']:.1f} / {total + act['full']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["dual-1b", "dual-3b", "dual-7b"])
    ap.add_argument("--dp", nargs="+", type=positive_int, default=[8, 64])
    ap.add_argument("--tp", type=positive_int, default=1)
    a = ap.parse_args(argv)
    print(
        "Computed on CPU from meta-device models (no GPU measured); bytes per parameter as in the module docstring.\n"
    )
    for preset in a.presets:
        for dp in a.dp:
            print(table(preset, dp, a.tp))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
