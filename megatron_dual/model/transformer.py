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

from megatron_dual.config import ConfigError, ModelConfig
from megatron_dual.model.attention import AttentionMask, attention, fused_qkv_attention
from megatron_dual.model.flops import flops_per_token  # noqa: F401  (re-exported; it lives in model/flops.py)
from megatron_dual.model.fused import RMSNorm, add_rms_norm, rotary_qkv, swiglu, use_triton
from megatron_dual.model.head import LMHead, trunc_normal_
from megatron_dual.model.padding import (
    Padding,
    logical_numel,
    pad,
    padded_parameter,
    padding_of,
    register_module_hooks,
    round_up,
)
from megatron_dual.model.precision import Linear  # nn.Linear; fp32 weight-gradient accumulation when tagged
from megatron_dual.model.rope import RotaryEmbedding, apply_rotary


@dataclass
class KVCache:
    """Pre-allocated keys and values for every layer: (n_layers, B, Hkv, max_len, D) each."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
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
        self.qkv = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.d, bias=False)
        self.out = Linear(self.n_heads * self.d, cfg.hidden_size, bias=False)

    @property
    def split_sizes(self) -> list[int]:
        return [self.n_heads * self.d, self.n_kv * self.d, self.n_kv * self.d]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, cache: KVCache | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x)
        fused = use_triton(self.fused_ops, qkv)
        if fused and cache is None:  # rotary + attention from qkv to (B, T, Hq D); one packed gradient for qkv
            y = fused_qkv_attention(qkv, cos, sin, (self.n_heads, self.n_kv, self.d), mask, self.backend)
            if y is not None:
                return self.out(y)
        if fused:  # q and k rotated in place on the projection's output
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
    """Fused up projection [up; gate] -> up * silu(gate) -> down (the reference's order).

    ``intermediate`` is the logical width (``model.intermediate_size``), ``width`` the physical one: rounded up to
    a multiple of ``model.pad_intermediate_to`` with zero units (see :mod:`megatron_dual.model.padding`), equal when
    no padding is asked for. State dicts hold the logical weights either way.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        multiple = getattr(cfg, "pad_intermediate_to", 1)
        if not isinstance(multiple, int) or multiple < 1:
            raise ConfigError(f"model.pad_intermediate_to = {multiple!r}: must be a positive integer (1: no padding)")
        self.pad_to = multiple
        self.intermediate = cfg.intermediate_size
        self.width = round_up(cfg.intermediate_size, multiple)
        self.fused_ops = cfg.fused_ops
        # built at the logical width first: the construction draws the same random numbers padded or not
        self.up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        if self.width != self.intermediate:
            self.set_padded_weights(self.up.weight, self.down.weight, self.intermediate, self.width)
            register_module_hooks(self)

    def set_padded_weights(self, up: torch.Tensor, down: torch.Tensor, logical: int, width: int) -> None:
        """Install logical ``up`` (2 x logical rows) and ``down`` (logical columns) weights, padded to ``width``."""
        self.up.weight = padded_parameter(up, Padding(0, ((logical, width), (logical, width))))
        self.down.weight = padded_parameter(down, Padding(1, ((logical, width),)))
        if isinstance(self.up, nn.Linear):  # (TP layers keep their full sizes)
            self.up.out_features, self.down.in_features = 2 * width, width
        self.intermediate, self.width = logical, width

    @torch.no_grad()
    def reset_parameters(self, std: float, scale: float) -> None:
        """Up/gate truncated normal (``std``) times ``scale``, down zero; padded units stay zero."""
        spec = padding_of(self.up.weight)
        if spec is None:
            trunc_normal_(self.up.weight, std)
            self.up.weight.mul_(scale)
        else:
            w = self.up.weight.new_empty(spec.logical_shape(self.up.weight.shape))
            trunc_normal_(w, std)
            self.up.weight.copy_(pad(w.mul_(scale), spec))
        self.down.weight.zero_()

    @property
    def split_sizes(self) -> list[int]:
        return [self.width, self.width]

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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
        normed: torch.Tensor | None = None,
        next_norm: RMSNorm | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` after the block. With ``normed`` (``attn_norm(x)``, made by the previous fused kernel) the fused
        path: each residual add runs with the norm after it in one kernel (``mlp_norm``, then ``next_norm``, the
        next block's ``attn_norm``), and the result is ``(x, next_norm(x))`` (``(x, None)`` without ``next_norm``)."""
        if normed is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
            return x + self.mlp(self.mlp_norm(x))
        x, h = add_rms_norm(x, self.attn(normed, cos, sin, mask, cache), self.mlp_norm)
        delta = self.mlp(h)
        if next_norm is None:
            return x + delta, None
        return add_rms_norm(x, delta, next_norm)


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
            block.mlp.reset_parameters(std_5h, math.sqrt(1.0 / (2.0 * (i + 1))))
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.head.reset_parameters()

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: AttentionMask,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
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
        if self.cfg.fused_ops in ("auto", "triton") and len(self.layers) and use_triton(self.cfg.fused_ops, x):
            x = self._fused_trunk(x, cos, sin, mask, cache)
        else:
            for block in self.layers:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length = start + t
        return x

    def _fused_trunk(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttentionMask, cache: KVCache | None
    ) -> torch.Tensor:
        """The blocks with fused residual-add + RMSNorm kernels: the residual stream keeps ``x``'s dtype (fp32
        under autocast), norm outputs are written in the autocast dtype (see ``kernels.rmsnorm.add_rms_norm``)."""
        layers = list(self.layers)
        h = layers[0].attn_norm(x)
        for block, nxt in zip(layers, [*layers[1:], None], strict=True):
            x, h = block(x, cos, sin, mask, cache, normed=h, next_norm=None if nxt is None else nxt.attn_norm)
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
    """Parameter counts at the logical shapes (the zero units of a padded MLP are not parameters of the model)."""
    cfg = model.cfg
    total = sum(logical_numel(p) for p in model.parameters())
    embed = model.embed.weight.numel()
    head = sum(p.numel() for p in model.head.parameters())
    per_layer = sum(logical_numel(p) for p in model.layers[0].parameters()) if cfg.n_layers else 0
    return {
        "total": total,
        "embedding": embed,
        "head": head,
        "non_embedding": total - embed - model.head.out.weight.numel() - model.head.out.bias.numel(),
        "trunk": per_layer * cfg.n_layers,
        "per_layer": per_layer,
    }
