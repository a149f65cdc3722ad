#!/bin/bash
# dual-470m with ZeRO-1 on the nodes of examples/deepspeed/hostfile through the deepspeed launcher (2 x 8 GPUs:
# 16 DP ranks x 16 slots = 256 objective slots, alpha = 63/64). The same config runs under torchrun or srun: only
# the launcher differs (see README, "DeepSpeed ZeRO").
#   examples/deepspeed/launch.sh                       # as below
#   HOSTFILE=my_hosts examples/deepspeed/launch.sh     # another hostfile
# CPU try-out on one machine (DeepSpeed's CPU accelerator, gloo):
#   DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module megatron_dual.train --preset tiny \
#       --set engine.name=deepspeed --set engine.zero_stage=3 --set train.grad_accum=2 --set data.path=...
set -euo pipefail
HOSTFILE=${HOSTFILE:-examples/deepspeed/hostfile}
# without its hostfile the deepspeed launcher only warns and runs on this node's GPUs: another world size and batch
if [[ ! -f "$HOSTFILE" ]]; then
    echo "launch.sh: hostfile '$HOSTFILE' not found (run from the repository root, or set HOSTFILE)" >&2
    exit 1
fi

deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --module megatron_dual.train \
    --preset dual-470m \
    --set engine.name=deepspeed \
    --set engine.zero_stage=1 \
    --set engine.deepspeed_config=examples/deepspeed/zero1.json \
    --set data.path=data/web_text_document \
    --set output_dir=runs/dual-470m-zero1 \
    --set train.grad_accum=16 \
    --resume auto
