from megatron_dual.model.attention import AttentionMask, attention
from megatron_dual.model.transformer import DualTransformer, KVCache, flops_per_token, param_counts

__all__ = ["AttentionMask", "attention", "DualTransformer", "KVCache", "flops_per_token", "param_counts"]
