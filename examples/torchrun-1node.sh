#!/bin/bash
# One node, 8 GPUs: dual-470m with DP 8 x 32 slots = 256 global slots (alpha 63/64 = 252 AR + 4 MD).
# On CPU (gloo) the same command works with the tiny preset, e.g.
#   torchrun --nproc-per-node 4 -m megatron_dual.train --preset tiny --set train.grad_accum=1 --set data.path=...
set -euo pipefail
torchrun --standalone --nproc-per-node 8 -m megatron_dual.train \
    --preset dual-470m \
    --set data.path=data/web_text_document \
    --set output_dir=runs/dual-470m \
    --set train.grad_accum=32 \
    --resume auto
