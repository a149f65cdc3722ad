"""Tensor-parallel (TP) layers and the sharding of the DualTransformer state dict.

Layers (each takes its TP process group in the constructor; ``None`` is a group of one):

* :class:`ColumnParallelLinear`: output features split over the ranks. With ``splits`` the *full* matrix is a
  stack of row blocks that are split separately, so the local shard is ``[block0_local; block1_local; ...]``:
  the fused qkv ``[q; k; v]`` (``splits = [Hq*D, Hkv*D, Hkv*D]``, rank r holds q heads ``r*Hq/tp ...`` and kv heads
  ``r*Hkv/tp ...``) and the SwiGLU ``[up; gate]`` (``splits = [I, I]``). Input: replicated (copy-to-TP-region) or,
  under sequence parallelism, sequence-sharded (all-gathered).
* :class:`RowParallelLinear`: input features split; the partial products are all-reduced (or reduce-scattered
  along the sequence under sequence parallelism).
* :class:`VocabParallelEmbedding`: vocabulary rows split; ids outside the local range look up zeros, the partial
  embeddings are all-reduced (reduce-scattered along the sequence under sequence parallelism).
* :class:`VocabParallelLMHead`: the reference GELU head (RMSNorm -> Linear(h, h) -> GELU(tanh) -> Linear(h, V, bias))
  with the norm and the projection replicated and the output layer (weight and bias) split over the vocabulary.

Every sharded parameter carries ``tensor_parallel_dim`` (the split dim) and ``tensor_parallel_splits`` (the full
row-block sizes split separately, or None when the plain dim is split); replicated parameters carry neither (the
DDP engine's global grad norm and distributed Muon rely on this). Shard r of a dim of size n is the r-th of ``tp``
equal contiguous chunks (of each block when ``splits`` is given); sizes must divide evenly.

State dicts: :func:`sharding_of` says how each DualTransformer tensor is split; :func:`shard_state_dict` and
:func:`gather_state_dict` map between the single-process state dict and the per-TP-rank ones (pure, bit-exact).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megatron_dual.config import ConfigError, ModelConfig
from megatron_dual.model.fused import RMSNorm
from megatron_dual.model.loss import LossSums
from megatron_dual.model.precision import linear
from megatron_dual.parallel.cross_entropy import vocab_parallel_loss_sums
from megatron_dual.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sp_region,
    scatter_to_tp_region,
)
from megatron_dual.parallel.state import group_rank, group_size

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "mark_tensor_parallel",
    "shard_tensor",
    "unshard_tensor",
    "sharding_of",
    "check_tp_divisibility",
    "shard_state_dict",
    "gather_state_dict",
]


# ----------------------------------------------------------------------------------------------- sharding of tensors
def _check_split(size: int, tp: int, what: str) -> None:
    if size % tp:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel size {tp}")


def shard_tensor(
    full: torch.Tensor, dim: int, splits: Sequence[int] | None, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of ``full``: chunk ``tp_rank`` of ``tp_size`` along ``dim``, of every row block of
    ``splits`` separately when given (then blocks lie along ``dim``)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} outside a tensor-parallel group of {tp_size}")
    blocks = [full] if not splits else list(full.split(list(splits), dim=dim))
    if splits and sum(splits) != full.shape[dim]:
        raise ValueError(f"splits {list(splits)} do not add up to dim {dim} of size {full.shape[dim]}")
    for b in blocks:
        _check_split(b.shape[dim], tp_size, f"dimension {dim} (block) of a tensor of shape {tuple(full.shape)}")
    return torch.cat([b.chunk(tp_size, dim=dim)[tp_rank] for b in blocks], dim=dim).contiguous()


def unshard_tensor(shards: Sequence[torch.Tensor], dim: int, splits: Sequence[int] | None) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from the shards of every rank, in rank order."""
    tp = len(shards)
    if not splits:
        return torch.cat(list(shards), dim=dim)
    local = []
    for n in splits:
        _check_split(n, tp, f"row block of size {n}")
        local.append(n // tp)
    pieces = [s.split(local, dim=dim) for s in shards]
    return torch.cat([pieces[r][b] for b in range(len(local)) for r in range(tp)], dim=dim)


def mark_tensor_parallel(param: torch.Tensor, dim: int, splits: Sequence[int] | None = None) -> torch.Tensor:
    """Tag ``param`` as a TP shard along ``dim`` (``splits``: full row blocks split separately)."""
    param.tensor_parallel_dim = dim  # type: ignore[attr-defined]
    param.tensor_parallel_splits = list(splits) if splits else None  # type: ignore[attr-defined]
    return param


def _from_full(full: torch.Tensor, dim: int, splits: Sequence[int] | None, group: Any) -> nn.Parameter:
    shard = shard_tensor(full.detach(), dim, splits, group_rank(group), group_size(group))
    return mark_tensor_parallel(nn.Parameter(shard.clone(), requires_grad=full.requires_grad), dim, splits)


# ------------------------------------------------------------------------------------------------------------ layers
class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with the rows of W (output features) split over the TP group.

    ``weight`` is the full (out_features, in_features) matrix to shard (e.g. an existing layer's weight: the result
    is then numerically the same layer); ``splits`` the full row blocks split separately. ``gather_output`` returns
    the full output (all-gathered, blocks reassembled) instead of the local features. ``sequence_parallel``: the
    input is sharded along dim 1 (the sequence) and all-gathered here. ``skip_input_mapping``: the caller already
    moved the input into the TP region (e.g. gathered the sequence itself): no collective on the input.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tp_group: Any,
        splits: Sequence[int] | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_input_mapping: bool = False,
    ) -> None:
        super().__init__()
        self.skip_input_mapping = skip_input_mapping
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.out_features, self.in_features = weight.shape
        self.splits = list(splits) if splits else None
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = _from_full(weight, 0, self.splits, tp_group)
        self.bias = _from_full(bias, 0, self.splits, tp_group) if bias is not None else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        tp_group: Any,
        splits: Sequence[int] | None = None,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_input_mapping: bool = False,
    ) -> ColumnParallelLinear:
        return cls(linear.weight, linear.bias, tp_group, splits, gather_output, sequence_parallel, skip_input_mapping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip_input_mapping:
            pass
        elif self.sequence_parallel:
            x = gather_from_sp_region(x, self.tp_group, dim=1, tensor_parallel_output_grad=True)
        else:
            x = copy_to_tp_region(x, self.tp_group)
        y = linear(x, self.weight, self.bias)  # fp32 weight-grad accumulation when tagged
        if not self.gather_output or self.tp_size == 1:
            return y
        y = gather_from_tp_region(y, self.tp_group, dim=-1)
        if self.splits:  # [b0_r0 b1_r0 .. | b0_r1 b1_r1 ..] -> [b0; b1; ..]
            y = unshard_tensor(y.chunk(self.tp_size, dim=-1), y.dim() - 1, self.splits)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (local "
            f"{self.weight.shape[0]}), tp={self.tp_size}, splits={self.splits}, bias={self.bias is not None}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with the columns of W (input features) split; partial products summed over the group.

    ``input_is_parallel``: ``x`` already holds this rank's input features (the output of a column-parallel
    layer); else it is split here. ``sequence_parallel``: the sum is reduce-scattered along dim 1 (the sequence).
    A bias is replicated and added after the reduction (marked ``sequence_parallel`` under sequence parallelism:
    its gradient then needs an all-reduce over TP, see ``tensor_parallel.sync_sequence_parallel_grads``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tp_group: Any,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.out_features, self.in_features = weight.shape
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = _from_full(weight, 1, None, tp_group)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
            if sequence_parallel:
                self.bias.sequence_parallel = True  # type: ignore[attr-defined]
        else:
            self.bias = None

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, tp_group: Any, input_is_parallel: bool = True, sequence_parallel: bool = False
    ) -> RowParallelLinear:
        return cls(linear.weight, linear.bias, tp_group, input_is_parallel, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group, dim=-1)
        y = linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sp_region(y, self.tp_group, dim=1)
        else:
            y = reduce_from_tp_region(y, self.tp_group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
            f"tp={self.tp_size}, bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split: rank r holds ids ``[r*V/tp, (r+1)*V/tp)``."""

    def __init__(self, weight: torch.Tensor, tp_group: Any, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.num_embeddings, self.embedding_dim = weight.shape
        _check_split(self.num_embeddings, self.tp_size, "model.vocab_size")
        self.sequence_parallel = sequence_parallel
        self.weight = _from_full(weight, 0, None, tp_group)
        per = self.num_embeddings // self.tp_size
        self.vocab_start = group_rank(tp_group) * per
        self.vocab_end = self.vocab_start + per

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, tp_group: Any, sequence_parallel: bool = False
    ) -> VocabParallelEmbedding:
        return cls(emb.weight, tp_group, sequence_parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
            out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(out, self.tp_group, dim=1)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, local ids [{self.vocab_start}, {self.vocab_end}), "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelLMHead(nn.Module):
    """The GELU head with its output layer (weight and bias) split over the vocabulary.

    ``norm`` and ``proj`` are replicated (every TP rank computes the same features); ``out`` is a
    :class:`ColumnParallelLinear` whose local logits cover ids ``[vocab_start, vocab_end)``. ``forward`` returns
    the *full* logits (gathered; for inference), ``local_logits`` the shard (for
    :func:`megatron_dual.model.loss.labelled_loss`). ``sequence_parallel``: the trunk's hidden
    states arrive sharded along the sequence and are gathered first.
    """

    def __init__(
        self,
        norm: RMSNorm,
        proj: nn.Linear,
        out: nn.Linear,
        tp_group: Any,
        fused_ops: str = "none",
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.tp_size = group_size(tp_group)
        self.fused_ops = fused_ops
        self.sequence_parallel = sequence_parallel
        self.vocab_size = out.out_features
        _check_split(self.vocab_size, self.tp_size, "model.vocab_size")
        self.norm = norm
        self.proj = proj
        self.out = ColumnParallelLinear.from_linear(out, tp_group)
        per = self.vocab_size // self.tp_size
        self.vocab_start = group_rank(tp_group) * per
        self.vocab_end = self.vocab_start + per

    @classmethod
    def from_head(cls, head: nn.Module, tp_group: Any, sequence_parallel: bool = False) -> VocabParallelLMHead:
        return cls(head.norm, head.proj, head.out, tp_group, getattr(head, "fused_ops", "none"), sequence_parallel)

    def gather_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-sequence hidden states (identity unless sequence parallel); the gradient stays replicated."""
        if self.sequence_parallel:
            return gather_from_sp_region(hidden, self.tp_group, dim=1, tensor_parallel_output_grad=False)
        return hidden

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(self.norm(hidden)), approximate="tanh")

    def local_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the local vocabulary shard (gradient of ``features`` all-reduced over TP in backward)."""
        return self.out(features)

    def chunk_sums(self, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, z_loss: float) -> LossSums:
        """Loss sums of selected rows ``h`` (N, H) against global labels ``y`` (the chunk step of
        :func:`megatron_dual.model.loss.labelled_loss`), without gathering the logits."""
        logits = self.local_logits(self.features(h))
        return vocab_parallel_loss_sums(logits, y, w, z_loss, self.tp_group, self.vocab_start)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.local_logits(self.features(self.gather_hidden(hidden)))
        return gather_from_tp_region(logits, self.tp_group, dim=-1)


# ------------------------------------------------------------------------------------------ state-dict sharding
_LAYER = re.compile(r"^layers\.\d+\.")


def sharding_of(name: str, cfg: ModelConfig) -> tuple[int, list[int] | None] | None:
    """``(dim, splits)`` of DualTransformer tensor ``name`` under TP, or None when it is replicated."""
    if name in ("embed.weight", "head.out.weight", "head.out.bias"):
        return 0, None
    if _LAYER.match(name):
        rest = _LAYER.sub("", name)
        d = cfg.head_dim
        if rest == "attn.qkv.weight":
            return 0, [cfg.n_heads * d, cfg.n_kv_heads * d, cfg.n_kv_heads * d]
        if rest == "mlp.up.weight":
            return 0, [cfg.intermediate_size, cfg.intermediate_size]
        if rest in ("attn.out.weight", "mlp.down.weight"):
            return 1, None
    return None


def check_tp_divisibility(cfg: ModelConfig, tp: int) -> None:
    """ConfigError naming the model field that ``tp`` (parallel.tp) does not divide."""
    if tp < 1:
        raise ConfigError(f"parallel.tp = {tp}: must be >= 1")
    fields = [
        ("model.n_heads", cfg.n_heads),
        ("model.n_kv_heads", cfg.n_kv_heads),
        ("model.intermediate_size", cfg.intermediate_size),
        ("model.vocab_size", cfg.vocab_size),
    ]
    for field, value in fields:
        if value % tp:
            ok = [t for t in range(1, tp + 1) if all(v % t == 0 for _, v in fields)]
            raise ConfigError(
                f"{field} = {value} is not divisible by parallel.tp = {tp}; tensor parallelism "
                f"splits it evenly over the TP ranks (tp that fit this model up to {tp}: "
                f"{', '.join(map(str, ok))})"
            )


def shard_state_dict(
    full_sd: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """TP rank ``tp_rank``'s state dict (the keys of ``full_sd``; sharded tensors cut, replicated ones shared)."""
    check_tp_divisibility(cfg, tp_size)
    out: dict[str, torch.Tensor] = {}
    for name, t in full_sd.items():
        spec = sharding_of(name, cfg)
        out[name] = t if spec is None or tp_size == 1 else shard_tensor(t, spec[0], spec[1], tp_rank, tp_size)
    return out


def gather_state_dict(shards: Sequence[Mapping[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The single-process state dict from the state dicts of TP ranks 0..tp-1 (replicated tensors from rank 0)."""
    if not shards:
        raise ValueError("gather_state_dict needs the state dict of at least one TP rank")
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise ValueError(f"TP rank {r}'s state dict differs from rank 0's in tensor {diff[0]!r}")
    out: dict[str, torch.Tensor] = {}
    for name in keys:
        spec = sharding_of(name, cfg)
        if spec is None or len(shards) == 1:
            out[name] = shards[0][name]
        else:
            out[name] = unshard_tensor([sd[name] for sd in shards], spec[0], spec[1])
    return out
