#!/bin/bash
# The images' entrypoint: `docker run IMAGE train --preset ...` runs `megatron-dual train --preset ...`;
# `docker run IMAGE python ...` / `bash` / `torchrun ...` / `deepspeed ...` run those instead (launchers, tools).
set -euo pipefail
case "${1:-}" in
    python|python3|bash|sh|torchrun|deepspeed|srun) exec "$@" ;;
    *) exec megatron-dual "$@" ;;
esac
