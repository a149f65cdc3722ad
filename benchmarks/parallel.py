"""Communication per optimizer step by parallel layout, and (on a GPU) the DDP engine's overhead.

CPU part (always): bytes each rank sends per step for a preset under each (tp, dp) layout of a world size,
from the ring-collective volumes of what the engine issues:
  * DP gradient all-reduce: 2 (dp-1)/dp x the rank's gradient bytes (fp32 buckets);
  * distributed Muon: each non-owned 2-D matrix arrives by broadcast ((dp-1)/dp of the Muon bytes per rank) and
    TP-sharded matrices are all-gathered over TP first ((tp-1)/tp of their full size);
  * tensor parallelism: 2 all-reduces of the activations per layer in forward and 2 in backward (attention output,
    MLP output), each 2 (tp-1)/tp x micro_batch x seq x hidden x 2 bytes (bf16), per micro-batch slot;
  * per-objective token counts and metrics: a few scalars (negligible, listed for completeness).
The model is checked against bytes counted on real gloo collectives of the `tiny` preset with 2 ranks.

GPU part (--gpu-steps N, needs CUDA): step time of the preset on one GPU with and without the DDP engine wrapper
(the engine's bucketing and hooks at dp=1), printed as a ratio; goal: overhead < 3 %.

    python benchmarks/parallel.py --preset dual-470m --world 8 64 256
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch

from megatron_dual.config import load_config, positive_int
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.parallel.state import rank_layout


def model_volume(
    preset: str, tp: int, dp: int, micro_batch: int, slots: int, seq_len: int | None = None
) -> dict[str, float]:
    cfg = load_config(preset=preset, overrides=["objective.alpha=1", "train.grad_accum=1"])
    m = cfg.model
    seq = seq_len or cfg.data.seq_len
    with torch.device("meta"):
        model = DualTransformer(m)
    total = sum(p.numel() for p in model.parameters())
    muon = sum(p.numel() for n, p in model.named_parameters() if model.is_trunk_matrix(n, p))
    # everything but norms is sharded over TP (embedding/head by vocab, trunk by heads / MLP columns)
    sharded = sum(p.numel() for p in model.parameters() if p.dim() == 2) + m.vocab_size
    per_rank = total - sharded + sharded / tp
    out = {
        "dp_grad_allreduce": 2 * (dp - 1) / dp * per_rank * 4,
        "muon_broadcast": (dp - 1) / dp * muon / tp * 4,
        "muon_tp_gather": (tp - 1) / tp * muon * 4,
        "tp_activations": (4 * m.n_layers * 2 * (tp - 1) / tp * micro_batch * seq * m.hidden_size * 2) * slots,
        "scalars": 2 * (dp - 1) / dp * (2 + 10) * 8,
    }
    out["total"] = sum(out.values())
    return out


def _count_worker(rank: int, world: int, port: int, result: str) -> None:
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    counted = {"bytes": 0.0}
    ws = world

    def wrap(fn, factor):
        def inner(tensor, *a, **k):
            t = tensor if isinstance(tensor, torch.Tensor) else a[0]
            counted["bytes"] += factor * t.numel() * t.element_size()
            return fn(tensor, *a, **k)

        return inner

    dist.all_reduce = wrap(dist.all_reduce, 2 * (ws - 1) / ws)
    dist.broadcast = wrap(dist.broadcast, (ws - 1) / ws)
    from megatron_dual.trainer import Trainer

    tmp = tempfile.mkdtemp()
    cfg_over = [
        f"output_dir={tmp}/run",
        f"data.path={result}_data",
        "train.grad_accum=1",
        "objective.alpha=1/2",
        "train.steps=2",
        "schedule.decay_steps=1",
        "train.eval_interval=0",
        "checkpoint.interval=0",
        "checkpoint.resume=none",
        "logging.plot=false",
        "train.threads=1",
    ]
    cfg = load_config(preset="tiny", overrides=cfg_over)
    tr = Trainer(cfg, quiet=True)
    tr.train_step(tr.loader.batches(0))
    counted["bytes"] = 0.0
    tr.train_step(tr.loader.batches(1))
    if rank == 0:
        with open(result, "w") as f:
            f.write(str(counted["bytes"]))
    dist.destroy_process_group()


def measured_tiny(world: int = 2) -> float:
    import torch.multiprocessing as mp

    from megatron_dual.data.indexed import IndexedDatasetWriter

    tmp = tempfile.mkdtemp()
    result = os.path.join(tmp, "bytes")
    g = torch.Generator().manual_seed(0)
    with IndexedDatasetWriter(result + "_data", "uint16") as w:
        for _ in range(64):
            w.add_document([1] + torch.randint(16, 4096, (300,), generator=g).tolist())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_count_worker, args=(world, port, result), nprocs=world, start_method="spawn")
    return float(open(result).read())


def gpu_overhead(preset: str, steps: int) -> None:
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device (run on a GPU machine with --gpu-steps N)")
        return
    from megatron_dual.engine.ddp import GradientBuckets
    from megatron_dual.parallel.state import ParallelState

    cfg = load_config(preset=preset, overrides=["objective.alpha=1", "train.grad_accum=1"])
    dev = torch.device("cuda")
    model = DualTransformer(cfg.model).to(dev)
    x = torch.randint(16, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), device=dev)
    from megatron_dual.model.attention import AttentionMask

    mask = AttentionMask("causal")

    def run(engine: GradientBuckets | None) -> float:
        times = []
        for i in range(steps + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if engine:
                engine.zero_grad()
            else:
                model.zero_grad(set_to_none=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = model(x, mask)
            h.float().square().mean().backward()
            if engine:
                engine.finish_grad_sync()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    plain = run(None)
    engine = GradientBuckets(model, ParallelState(1, 0), cfg.parallel.bucket_mb)
    wrapped = run(engine)
    print(
        f"{preset} fwd+bwd on {torch.cuda.get_device_name()}: plain {plain * 1e3:.1f} ms, DDP engine "
        f"{wrapped * 1e3:.1f} ms, overhead {100 * (wrapped / plain - 1):+.2f}% (goal < 3%)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dual-470m")
    ap.add_argument("--world", type=positive_int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--micro-batch", type=positive_int, default=8)
    ap.add_argument("--slots", type=positive_int, default=1)
    ap.add_argument("--no-measure", action="store_true", help="skip the gloo measurement of the tiny preset")
    ap.add_argument("--gpu-steps", type=int, default=0)
    args = ap.parse_args(argv)
    print(
        f"communication per rank per step, {args.preset}, micro-batch {args.micro_batch} x {args.slots} slot(s), "
        f"ring collectives (MB):"
    )
    print(
        f"{'world':>6} {'tp':>3} {'dp':>4} {'DP grads':>10} {'Muon bcast':>11} {'Muon TP':>9} {'TP activ.':>10} "
        f"{'total':>10}"
    )
    for world in args.world:
        for tp in (1, 2, 4, 8):
            if world % tp or tp > world:
                continue
            lay = rank_layout(world, tp)
            v = model_volume(args.preset, tp, lay.dp, args.micro_batch, args.slots)
            mb = {k: x / 2**20 for k, x in v.items()}
            print(
                f"{world:>6} {tp:>3} {lay.dp:>4} {mb['dp_grad_allreduce']:>10.1f} {mb['muon_broadcast']:>11.1f} "
                f"{mb['muon_tp_gather']:>9.1f} {mb['tp_activations']:>10.1f} {mb['total']:>10.1f}"
            )
    if not args.no_measure:
        predicted = model_volume("tiny", 1, 2, 8, 1)["total"]
        measured = measured_tiny(2)
        print(
            f"check on tiny, dp 2 (gloo, bytes counted on the collectives issued): measured "
            f"{measured / 2**20:.3f} MB, model {predicted / 2**20:.3f} MB, ratio {measured / predicted:.3f}"
        )
    if args.gpu_steps:
        gpu_overhead(args.preset, args.gpu_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
