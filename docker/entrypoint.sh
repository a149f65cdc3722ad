#!/bin/bash
# The images' entrypoint: `docker run IMAGE train --preset ...` runs `megatron-dual train --preset ...`;
# `docker run IMAGE python ...` / `bash` / `torchrun ...` / `deepspeed ...` run those instead (launchers, tools), and
# `docker run IMAGE megatron-dual train ...` (the command named, as habit has it) is `megatron-dual train ...` too.
set -euo pipefail
case "${1:-}" in
    python|python3|bash|sh|torchrun|deepspeed|srun|megatron-dual) exec "$@" ;;
    *) exec megatron-dual "$@" ;;
esac
