"""Inference: causal / prefix-LM generation with a KV cache, masked-diffusion generation and infilling, MNTP
fill-mask, checkpoint loading."""

from megatron_dual.inference.diffusion import (
    DiffusionConfig,
    diffusion_generate,
    diffusion_infill,
    infill_text,
    row_schedule,
    transfer_schedule,
)
from megatron_dual.inference.fill_mask import encode_with_masks, fill_mask, fill_mask_ids, mask_distributions
from megatron_dual.inference.generate import (
    diffusion_text,
    filter_logits,
    generate,
    generate_text,
    prompt_lists,
    sample_next,
)
from megatron_dual.inference.loading import find_checkpoint, load_model, read_checkpoint_config

__all__ = [
    "DiffusionConfig",
    "diffusion_generate",
    "diffusion_infill",
    "infill_text",
    "row_schedule",
    "transfer_schedule",
    "encode_with_masks",
    "fill_mask",
    "fill_mask_ids",
    "mask_distributions",
    "diffusion_text",
    "filter_logits",
    "generate",
    "generate_text",
    "prompt_lists",
    "sample_next",
    "find_checkpoint",
    "load_model",
    "read_checkpoint_config",
]
