"""Inference: causal / prefix-LM generation with a KV cache, MNTP fill-mask, checkpoint loading."""

from megatron_dual.inference.fill_mask import encode_with_masks, fill_mask, fill_mask_ids, mask_distributions
from megatron_dual.inference.generate import filter_logits, generate, generate_text, sample_next
from megatron_dual.inference.loading import find_checkpoint, load_model, read_checkpoint_config

__all__ = [
    "encode_with_masks",
    "fill_mask",
    "fill_mask_ids",
    "mask_distributions",
    "filter_logits",
    "generate",
    "generate_text",
    "sample_next",
    "find_checkpoint",
    "load_model",
    "read_checkpoint_config",
]
