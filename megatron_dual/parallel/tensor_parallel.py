"""Apply tensor parallelism (TP) to a :class:`~megatron_dual.model.transformer.DualTransformer` from outside.

The model file has no parallel code (torchtitan's habit); :func:`parallelize_model` replaces its modules in place
with the TP layers of :mod:`megatron_dual.parallel.layers`, each holding this rank's shard of the existing full
weights. Build the full model with the same seed on every rank, then parallelize: initialisation equals the
single-process model for any TP size. Per block:

* ``attn.qkv`` -> column parallel split by heads (local ``[q_local; k_local; v_local]``), ``attn.n_heads`` and
  ``attn.n_kv`` become the local head counts; ``attn.out`` -> row parallel;
* ``mlp.up`` -> column parallel split per block (local ``[up_local; gate_local]``), ``mlp.intermediate`` local;
  ``mlp.down`` -> row parallel;
* ``embed`` -> :class:`VocabParallelEmbedding`; ``head`` -> :class:`VocabParallelLMHead` (norm and projection
  replicated, output layer and bias split over the vocabulary).

State-dict keys stay those of the single-process model (shapes are local), so ``model.muon_split_sizes()`` and
``model.is_trunk_matrix`` keep working (split sizes become the local ones). ``model(input_ids, mask)`` returns the
full hidden states, replicated over TP; with ``sequence_parallel=True`` the residual stream (and the output) is
sharded along the sequence (dim 1) between the column- and row-parallel layers, norms run on the local positions,
and their weights carry ``sequence_parallel = True``: call :func:`sync_sequence_parallel_grads` after backward
(before the DP all-reduce) to sum their gradients over TP. The loss of a TP model is
:func:`megatron_dual.model.loss.labelled_loss` (it gathers the sequence when needed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_dual.config import ConfigError
from megatron_dual.model.padding import padding_of, round_up, unpad
from megatron_dual.model.transformer import DualTransformer
from megatron_dual.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    check_tp_divisibility,
    gather_state_dict,
    mark_tensor_parallel,
    shard_state_dict,
    sharding_of,
)
from megatron_dual.parallel.mappings import gather_from_sp_region
from megatron_dual.parallel.state import group_size

__all__ = [
    "parallelize_model",
    "sync_sequence_parallel_grads",
    "sequence_parallel_params",
    "shard_state_dict",
    "gather_state_dict",
    "sharding_of",
    "check_tp_divisibility",
]


def parallelize_model(model: DualTransformer, tp_group: Any, sequence_parallel: bool = False) -> DualTransformer:
    """Shard ``model`` in place over ``tp_group`` (see the module docstring); returns ``model``.

    Sets ``model.tp_group``, ``model.tp_size`` and ``model.sequence_parallel``. A ConfigError names the model field
    the TP size does not divide.
    """
    if getattr(model, "tp_group", None) is not None or isinstance(model.embed, VocabParallelEmbedding):
        raise ValueError("parallelize_model: this model is already tensor parallel")
    tp = group_size(tp_group)
    cfg = model.cfg
    check_tp_divisibility(cfg, tp)
    sp = bool(sequence_parallel)
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, tp_group, sequence_parallel=sp)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        # under SP the attention module gathers the sequence itself (its forward reads T from its input)
        attn.qkv = ColumnParallelLinear.from_linear(
            attn.qkv, tp_group, splits=attn.split_sizes, skip_input_mapping=sp and tp > 1
        )
        attn.out = RowParallelLinear.from_linear(attn.out, tp_group, sequence_parallel=sp)
        attn.n_heads //= tp
        attn.n_kv //= tp
        _parallelize_mlp(mlp, tp_group, tp, sp)
        if sp and tp > 1:
            attn.tp_group = tp_group
            attn.__class__ = _sequence_parallel_class(type(attn))
        if sp:
            for norm in (block.attn_norm, block.mlp_norm):
                for p in norm.parameters():
                    p.sequence_parallel = True  # type: ignore[attr-defined]
    model.head = VocabParallelLMHead.from_head(model.head, tp_group, sequence_parallel=sp)
    model.tp_group = tp_group
    model.tp_size = tp
    model.sequence_parallel = sp
    if sp and tp > 1:
        model.register_forward_pre_hook(_check_sequence_length)
    return model


def _parallelize_mlp(mlp: nn.Module, tp_group: Any, tp: int, sp: bool) -> None:
    """Shard the SwiGLU MLP. A padded MLP is sharded at its logical width (the TP shards of the checkpoint layout)
    and each rank's shard padded again to an aligned local width, so every rank's matmuls are aligned and its
    state dict is exactly its logical shard."""
    spec = padding_of(mlp.up.weight)
    if spec is None:
        mlp.up = ColumnParallelLinear.from_linear(mlp.up, tp_group, splits=mlp.split_sizes, sequence_parallel=sp)
        mlp.down = RowParallelLinear.from_linear(mlp.down, tp_group, sequence_parallel=sp)
        mlp.intermediate //= tp
        mlp.width //= tp
        return
    logical = mlp.intermediate
    up_full = unpad(mlp.up.weight.detach(), spec).requires_grad_(mlp.up.weight.requires_grad)
    down_full = unpad(mlp.down.weight.detach(), padding_of(mlp.down.weight)).requires_grad_(
        mlp.down.weight.requires_grad
    )
    up = ColumnParallelLinear(up_full, None, tp_group, splits=[logical, logical], sequence_parallel=sp)
    down = RowParallelLinear(down_full, None, tp_group, sequence_parallel=sp)
    mlp.up, mlp.down = up, down
    local = logical // tp
    mlp.set_padded_weights(up.weight, down.weight, local, round_up(local, mlp.pad_to))
    mark_tensor_parallel(mlp.up.weight, 0, [tp * mlp.width] * 2)
    mark_tensor_parallel(mlp.down.weight, 1)


class _SequenceParallelAttention(nn.Module):
    """Mixin put in front of the attention class under sequence parallelism (the way FSDP2 swaps classes): the
    input arrives sharded along the sequence and is all-gathered before the unchanged attention code runs; the
    gradient of the gathered input (partial over the TP ranks' heads) is reduce-scattered back."""

    tp_group: Any

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = gather_from_sp_region(x, self.tp_group, dim=1, tensor_parallel_output_grad=True)
        return super().forward(x, *args, **kwargs)


_SP_CLASSES: dict[type, type] = {}


def _sequence_parallel_class(cls: type) -> type:
    if issubclass(cls, _SequenceParallelAttention):
        return cls
    if cls not in _SP_CLASSES:
        _SP_CLASSES[cls] = type(f"SequenceParallel{cls.__name__}", (_SequenceParallelAttention, cls), {})
    return _SP_CLASSES[cls]


def _check_sequence_length(model: nn.Module, args: tuple) -> None:
    t = args[0].shape[1]
    if t % model.tp_size:
        raise ConfigError(
            f"sequence parallelism splits the sequence over parallel.tp = {model.tp_size} ranks: the "
            f"model input has {t} positions, not a multiple of {model.tp_size}"
        )


def sequence_parallel_params(model: nn.Module) -> list[nn.Parameter]:
    """Replicated parameters whose gradient is a partial sum over TP under sequence parallelism."""
    return [p for p in model.parameters() if getattr(p, "sequence_parallel", False)]


def sync_sequence_parallel_grads(model: nn.Module, tp_group: Any = None) -> None:
    """All-reduce (sum) the gradients of the ``sequence_parallel`` parameters over TP, in one flat buffer."""
    group = tp_group if tp_group is not None else getattr(model, "tp_group", None)
    if group_size(group) == 1:
        return
    grads = [p.grad for p in sequence_parallel_params(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
