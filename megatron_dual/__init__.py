"""megatron-dual: a training stack for dual-objective (AR + masked-diffusion) language models."""

__version__ = "0.1.0"
