"""Muon for 2-D trunk matrices (Moonlight scaling), AdamW (PyTorch's) for everything else.

Fused matrices are orthogonalised block by block (q, k, v and up, gate separately), as the reference keeps them as
separate parameters. Update per block of shape (A, B):
``W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * NS5(nesterov_momentum(G))`` with ``match_rms_adamw``
scaling, or ``lr * sqrt(max(1, A / B))`` with ``original`` scaling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.model.padding import register_optimizer_hooks

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T by the quintic Newton-Schulz iteration (bf16 on GPU, fp32 on CPU)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16() if g.is_cuda else g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    if transposed:
        x = x.T
    return x.to(g.dtype)


HEAD_PROJECTION = "head.proj.weight"  # the reference's classifier.projection (optimizer.muon_head puts it on Muon)
OPTIMIZERS = ("muon", "adamw")  # optimizer.name: Muon for 2-D trunk matrices (AdamW for the rest) | AdamW for all
LR_ADJUSTMENTS = ("match_rms_adamw", "original")  # optimizer.muon_adjust_lr: the modes of muon_lr_scale


def muon_lr_scale(rows: int, cols: int, mode: str) -> float:
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"unknown Muon lr adjustment {mode!r}; choose match_rms_adamw or original")


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalised by Newton-Schulz. Param groups may carry ``splits``: row block sizes of a fused
    matrix, each orthogonalised (and lr-scaled) on its own."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
    ) -> None:
        muon_lr_scale(1, 1, adjust_lr)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr=adjust_lr,
            splits=None,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
                if group["splits"] is not None and sum(group["splits"]) != p.shape[0]:
                    raise ValueError(
                        f"splits {group['splits']} do not add up to the {p.shape[0]} rows of a "
                        f"parameter of shape {tuple(p.shape)}"
                    )

    def distribute(self, parallel: Any) -> Muon:
        """Orthogonalise each matrix once per data-parallel group instead of on every replica.

        ``parallel`` is a :class:`megatron_dual.parallel.state.ParallelState`. Matrices are dealt to DP ranks
        (largest first, to the least loaded owner); the owner runs Newton-Schulz on the *whole* matrix (TP shards are
        gathered over the TP group and their row blocks reassembled first) and broadcasts the update to its DP peers;
        every rank applies its own shard. The result equals single-process Muon.
        """
        self._parallel = parallel
        self._owners = None
        return self

    def _assign_owners(self) -> dict[int, int]:
        par = self._parallel
        params = [p for g in self.param_groups for p in g["params"]]
        load = [0] * par.dp_size
        owners: dict[int, int] = {}
        for i in sorted(range(len(params)), key=lambda i: (-_full_numel(params[i], par.tp_size), i)):
            owner = min(range(par.dp_size), key=lambda r: (load[r], r))
            owners[id(params[i])] = owner
            load[owner] += _full_numel(params[i], par.tp_size)
        return owners

    def _orthogonalised(
        self, update: torch.Tensor, splits: list[int], group: dict, logical: list[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """Newton-Schulz per row block; the lr scale from each block's ``logical`` shape (that of the unpadded
        matrix when the parameter is padded) or its own."""
        out = torch.empty_like(update)
        shapes = logical or [(n, update.shape[1]) for n in splits]
        for o_block, g_block, (rows, cols) in zip(
            out.split(splits, dim=0), update.split(splits, dim=0), shapes, strict=True
        ):
            scale = muon_lr_scale(rows, cols, group["adjust_lr"])
            o_block.copy_(zeropower_newton_schulz(g_block, group["ns_steps"]).mul_(scale))
        return out

    def _momentum_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance ``p``'s momentum buffer by its gradient; the (Nesterov) update to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        return p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    def _step_local(self, p: torch.Tensor, update: torch.Tensor, group: dict[str, Any]) -> None:
        lr = group["lr"]
        p.mul_(1.0 - lr * group["weight_decay"])
        splits = group["splits"] or [p.shape[0]]
        p.add_(self._orthogonalised(update, splits, group, logical_blocks(p, splits, update.shape[1])), alpha=-lr)

    def _launch_owned(self, p: torch.Tensor, update: torch.Tensor, group: dict[str, Any], par: Any) -> tuple:
        """The owner orthogonalises the whole (TP-gathered) matrix and broadcasts it to its DP peers (async)."""
        full, splits = _gather_full(update, p, par, group["splits"])
        owner = self._owners[id(p)]
        if owner == par.dp_rank:
            delta = self._orthogonalised(full, splits, group, logical_blocks(p, splits, full.shape[1], par.tp_size))
        else:
            delta = torch.empty_like(full)
        work = None
        if par.dp_size > 1:
            src = par.layout.rank_of(owner, par.tp_rank)
            work = dist.broadcast(delta, src=src, group=par.dp_group, async_op=True)
        return p, delta, work, group["lr"], group["weight_decay"]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        par = getattr(self, "_parallel", None)
        distributed = par is not None and (par.dp_size > 1 or par.tp_size > 1)
        if distributed and self._owners is None:
            self._owners = self._assign_owners()
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self._momentum_update(p, group)
                if distributed:
                    pending.append(self._launch_owned(p, update, group, par))
                else:
                    self._step_local(p, update, group)
        for p, delta, work, lr, wd in pending:
            if work is not None:
                work.wait()
            p.mul_(1.0 - lr * wd)
            p.add_(_local_shard(delta, p, par), alpha=-lr)
        return loss


def logical_blocks(p: torch.Tensor, splits: list[int], cols: int, tp: int = 1) -> list[tuple[int, int]] | None:
    """Logical (rows, cols) of each row block of the (possibly TP-gathered) update of ``p``, when ``p`` carries a
    :class:`~megatron_dual.model.padding.Padding`; None otherwise. A TP shard's padding repeats on every rank of
    the group along a sharded dim, hence ``tp`` times in the gathered matrix."""
    spec = getattr(p, "padding", None)
    if spec is None:
        return None
    reps = tp if getattr(p, "tensor_parallel_dim", None) == spec.dim else 1
    missing = [reps * (phys - n) for n, phys in spec.blocks]
    if spec.dim == 0:
        if len(missing) != len(splits):
            raise ValueError(f"padding blocks {spec.blocks} do not match the Muon row blocks {splits}")
        return [(rows - m, cols) for rows, m in zip(splits, missing, strict=True)]
    return [(rows, cols - sum(missing)) for rows in splits]


def _full_numel(p: torch.Tensor, tp: int) -> int:
    return p.numel() * (tp if getattr(p, "tensor_parallel_dim", None) is not None else 1)


def _gather_full(
    update: torch.Tensor, p: torch.Tensor, par: Any, group_splits: list[int] | None
) -> tuple[torch.Tensor, list[int]]:
    """The whole matrix of a TP-sharded ``update`` and its full row-block sizes (identity when not sharded)."""
    dim = getattr(p, "tensor_parallel_dim", None)
    if dim is None or par.tp_size == 1:
        return update, list(group_splits or [update.shape[0]])
    parts = [torch.empty_like(update) for _ in range(par.tp_size)]
    dist.all_gather(parts, update.contiguous(), group=par.tp_group)
    full_splits = getattr(p, "tensor_parallel_splits", None)
    if dim == 0 and full_splits:
        local = [n // par.tp_size for n in full_splits]
        pieces = [part.split(local, dim=0) for part in parts]
        full = torch.cat([pieces[r][b] for b in range(len(local)) for r in range(par.tp_size)], dim=0)
        return full, list(full_splits)
    full = torch.cat(parts, dim=dim)
    return full, [full.shape[0]]


def _local_shard(delta: torch.Tensor, p: torch.Tensor, par: Any) -> torch.Tensor:
    dim = getattr(p, "tensor_parallel_dim", None)
    if dim is None or par is None or par.tp_size == 1:
        return delta
    full_splits = getattr(p, "tensor_parallel_splits", None)
    r, n = par.tp_rank, par.tp_size
    if dim == 0 and full_splits:
        return torch.cat([blk.chunk(n, dim=0)[r] for blk in delta.split(list(full_splits), dim=0)], dim=0)
    return delta.chunk(n, dim=dim)[r]


def _adamw(groups: list[dict], lr: float, cfg: Any) -> torch.optim.Optimizer:
    """PyTorch's AdamW, or apex's FusedAdam (AdamW mode) with ``optimizer.adamw_impl = apex`` where it can run."""
    if getattr(cfg, "adamw_impl", "torch") == "apex":
        from megatron_dual.model.apex_ops import apex_fused_adam

        fused = apex_fused_adam(all(p.is_cuda for g in groups for p in g["params"]))
        if fused is not None:
            return fused(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)


def build_optimizers(model: torch.nn.Module, cfg) -> dict[str, torch.optim.Optimizer]:
    """``{"muon": Muon over 2-D trunk matrices (and the head's hidden projection with ``optimizer.muon_head``),
    "adamw": AdamW over the rest}`` (or only AdamW)."""
    splits: dict[str, list[int]] = model.muon_split_sizes() if hasattr(model, "muon_split_sizes") else {}
    muon_groups: dict[tuple[int, ...] | None, list[torch.nn.Parameter]] = {}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.name == "muon" and (model.is_trunk_matrix(name, p) or (cfg.muon_head and name == HEAD_PROJECTION)):
            key = tuple(splits[name]) if name in splits else None
            muon_groups.setdefault(key, []).append(p)
        elif cfg.decay_all or p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    adamw_lr = cfg.adamw_lr or cfg.lr
    out: dict[str, torch.optim.Optimizer] = {}
    if muon_groups:
        groups = [{"params": ps, "splits": list(k) if k else None} for k, ps in muon_groups.items()]
        out["muon"] = Muon(
            groups,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            ns_steps=cfg.ns_steps,
            adjust_lr=cfg.muon_adjust_lr,
        )
    adam_groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        adam_groups.append({"params": no_decay, "weight_decay": 0.0})
    out["adamw"] = _adamw(adam_groups, adamw_lr, cfg)
    for opt in out.values():  # padded MLP weights: optimizer state saved and loaded at the logical shape
        register_optimizer_hooks(opt)
    return out
