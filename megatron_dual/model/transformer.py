"""The reference dual-objective transformer (ltg/dual-lm-470m layout).

Pre-norm decoder blocks (RMSNorm with learnable scale, fused QKV attention with RoPE, SwiGLU MLP), no biases and no
final norm in the trunk, untied embeddings; the GELU head lives in :mod:`megatron_dual.model.head`. The model does
not know which objective it runs: the caller passes an :class:`AttentionMask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megatron_dual.config import ModelConfig
from megatron_dual.model.attention import AttentionMask, attention
from megatron_dual.model.fused import RMSNorm, rotary_qkv, swiglu, use_triton
from megatron_dual.model.head import LMHead, trunc_normal_
from megatron_dual.model.rope import RotaryEmbedding, apply_rotary


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer: (n_layers, B, Hkv, max_len, D) each."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> KVCache:
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.backend = cfg.attention_backend
        self.fused_ops = cfg.fused_ops
        self.qkv = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.d, bias=False)
        self.out = nn.Linear(self.n_heads * self.d, cfg.hidden_size, bias=False)

    @property
    def split_sizes(self) -> list[int]:
        return [self.n_heads * self.d, self.n_kv * self.d, self.n_kv * self.d]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        if use_triton(self.fused_ops, qkv):  # q and k rotated in place on the projection's output
            q, k, v = rotary_qkv(qkv, cos, sin, self.n_heads, self.n_kv, self.d)
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            q = q.view(b, t, self.n_heads, self.d).transpose(1, 2)
            k = k.view(b, t, self.n_kv, self.d).transpose(1, 2)
            v = v.view(b, t, self.n_kv, self.d).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            start = cache.length
            cache.k[self.layer_idx, :, :, start : start + t] = k
            cache.v[self.layer_idx, :, :, start : start + t] = v
            k = cache.k[self.layer_idx, :, :, : start + t]
            v = cache.v[self.layer_idx, :, :, : start + t]
        y = attention(q, k, v, mask, backend=self.backend)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.d))


class SwiGLU(nn.Module):
    """Fused up projection [up; gate] -> up * silu(gate) -> down (the reference's order)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.fused_ops = cfg.fused_ops
        self.up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    @property
    def split_sizes(self) -> list[int]:
        return [self.intermediate, self.intermediate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if use_triton(self.fused_ops, h):
            return self.down(swiglu(h))
        up, gate = h.chunk(2, dim=-1)
        return self.down(up * nn.functional.silu(gate))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.fused_ops)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.fused_ops)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class DualTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()  # in place: a config built by hand gets its null n_kv_heads / head_dim resolved
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.norm_eps, cfg.fused_ops)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation (truncated normal at +-2 std)."""
        h = self.cfg.hidden_size
        trunc_normal_(self.embed.weight, math.sqrt(2.0 / (h + self.cfg.vocab_size)))
        std_5h = math.sqrt(2.0 / (5 * h))
        for i, block in enumerate(self.layers):
            trunc_normal_(block.attn.qkv.weight, std_5h)
            block.attn.out.weight.zero_()
            trunc_normal_(block.mlp.up.weight, std_5h)
            block.mlp.up.weight.mul_(math.sqrt(1.0 / (2.0 * (i + 1))))
            block.mlp.down.weight.zero_()
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.head.reset_parameters()

    def forward(self, input_ids: torch.Tensor, mask: AttentionMask, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Trunk hidden states (B, T, hidden); no final norm (the head has its own)."""
        t = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if cache is not None and start + t > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {start + t} requested")
        if positions is None:
            positions = torch.arange(start, start + t, device=input_ids.device)
        if int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        cos, sin = self.rope.cos_sin(positions)
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = start + t
        return x

    def logits(self, input_ids: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        """Full logits (B, T, vocab) for inference; training uses :func:`labelled_loss` instead."""
        return self.head(self(input_ids, mask, cache=cache)).float()

    def muon_split_sizes(self) -> dict[str, list[int]]:
        """Fused matrices whose blocks the reference orthogonalises separately (q/k/v and up/gate)."""
        out: dict[str, list[int]] = {}
        for i, block in enumerate(self.layers):
            out[f"layers.{i}.attn.qkv.weight"] = block.attn.split_sizes
            out[f"layers.{i}.mlp.up.weight"] = block.mlp.split_sizes
        return out

    def is_trunk_matrix(self, name: str, param: nn.Parameter) -> bool:
        """2-D trunk matrices (Muon's share); embeddings, norms and the head go to AdamW."""
        return name.startswith("layers.") and param.dim() == 2


def param_counts(model: DualTransformer) -> dict[str, int]:
    cfg = model.cfg
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed.weight.numel()
    head = sum(p.numel() for p in model.head.parameters())
    per_layer = sum(p.numel() for p in model.layers[0].parameters()) if cfg.n_layers else 0
    return {
        "total": total,
        "embedding": embed,
        "head": head,
        "non_embedding": total - embed - model.head.out.weight.numel() - model.head.out.bias.numel(),
        "trunk": per_layer * cfg.n_layers,
        "per_layer": per_layer,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, PaLM-style accounting.

    Attention scores count half the T x T matrix when causal (what a block-skipping kernel computes).
    """
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = 2 * h * (cfg.n_heads + 2 * cfg.n_kv_heads) * d
    attn_out = 2 * cfg.n_heads * d * h
    mlp = 2 * h * 2 * cfg.intermediate_size + 2 * cfg.intermediate_size * h
    scores = 2 * 2 * cfg.n_heads * d * seq_len * (0.5 if causal else 1.0)
    layer = qkv + attn_out + mlp + scores
    head = 2 * h * h + 2 * h * cfg.vocab_size
    fwd = cfg.n_layers * layer + head
    return {"forward": float(fwd), "train": float(3 * fwd), "per_layer_forward": float(layer)}
