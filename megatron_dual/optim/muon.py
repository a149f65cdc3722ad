"""Muon for 2-D trunk matrices (Moonlight scaling), AdamW (PyTorch's) for everything else.

Fused matrices are orthogonalised block by block (q, k, v and up, gate separately), as the reference keeps them as
separate parameters. Update per block of shape (A, B):
``W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(A, B)) * NS5(nesterov_momentum(G))`` with ``match_rms_adamw``
scaling, or ``lr * sqrt(max(1, A / B))`` with ``original`` scaling.

Newton-Schulz runs per block (:func:`zeropower_newton_schulz`, the CPU default, whose floats ``make demo`` pins) or
batched (:func:`orthogonalise_blocks`: the blocks of a step stacked by shape, transposed ones with them, and iterated
with ``baddbmm``, a few launches per shape instead of ~40 per block; the CUDA default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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


# Elements of one stacked Newton-Schulz batch: bounds the extra memory of the batched path (in bf16 on GPU, 256 MiB
# for the stack plus about three temporaries of at most its size); a bigger shape group runs in several chunks.
NS_BATCH_NUMEL = 1 << 27


def newton_schulz_batched(x: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """:func:`zeropower_newton_schulz` of every matrix of the stack ``x`` (n, rows, cols), rows <= cols, in ``x``'s
    dtype. ``baddbmm`` fuses each polynomial step: ``c * (M @ M) + b * M``, then ``Y @ X + a * X`` (the per-block
    path computes ``(c * M) @ M``: the two agree to rounding)."""
    a, b, c = NS_COEFFICIENTS
    x = x / (torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True) + eps)
    for _ in range(steps):
        m = torch.bmm(x, x.mT)
        y = torch.baddbmm(m, m, m, beta=b, alpha=c)
        x = torch.baddbmm(x, y, x, beta=a)
    return x


# One block to orthogonalise: (momentum-updated source, destination of the scaled result, lr scale, NS steps).
Block = tuple[torch.Tensor, torch.Tensor, float, int]


def orthogonalise_blocks(blocks: list[Block], batched: bool) -> None:
    """Write ``scale * NS5(src)`` into ``dst`` for every block: one by one (the original floats), or stacked by
    (shape up to transposition, steps) in chunks of at most :data:`NS_BATCH_NUMEL` elements."""
    if not batched:
        for src, dst, scale, steps in blocks:
            dst.copy_(zeropower_newton_schulz(src, steps).mul_(scale))
        return
    groups: dict[tuple[int, int, int], list[Block]] = {}
    for blk in blocks:
        rows, cols = blk[0].shape
        groups.setdefault((min(rows, cols), max(rows, cols), blk[3]), []).append(blk)
    for (rows, cols, _), members in groups.items():
        per_chunk = max(1, NS_BATCH_NUMEL // max(1, rows * cols))  # (a zero-size block: one per chunk)
        for i in range(0, len(members), per_chunk):
            _orthogonalise_stack(members[i : i + per_chunk])


def _orthogonalise_stack(members: list[Block]) -> None:
    """One stack of same-shape blocks: bf16 on GPU and fp32 on CPU (as the per-block path), wide orientation."""
    first = members[0][0]
    dtype = torch.bfloat16 if first.is_cuda else torch.float32
    rows, cols = sorted(first.shape)
    x = torch.empty((len(members), rows, cols), dtype=dtype, device=first.device)
    for slot, (src, _, _, _) in zip(x, members, strict=True):
        slot.copy_(src.mT if src.shape[0] > src.shape[1] else src)
    x = newton_schulz_batched(x, members[0][3])
    for slot, (src, dst, _, _) in zip(x, members, strict=True):
        dst.copy_(slot.mT if src.shape[0] > src.shape[1] else slot)
    torch._foreach_mul_([m[1] for m in members], [m[2] for m in members])  # the lr scales, in the result's dtype


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
        batched: bool | None = None,
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
        # Newton-Schulz stacked by shape (True), block by block (False), or None: stacked on CUDA only. On CPU the
        # stacked path rounds differently from the per-block one (bmm/baddbmm vs mm; make demo's losses are pinned)
        # and the launches it saves cost nothing there.
        self.batched = batched
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
        gathered over the TP group and their row blocks reassembled first; an owner's matrices batched together) and
        broadcasts the update to its DP peers; every rank applies its own shard. The result equals single-process
        Muon.
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

    def orthogonalised(self, jobs: list[tuple[torch.Tensor, list[int], dict, list | None]]) -> list[torch.Tensor]:
        """The scaled Newton-Schulz result of each job ``(update, row splits, param group, logical block shapes)``:
        per row block, lr-scaled from its ``logical`` shape (that of the unpadded matrix when the parameter is
        padded) or its own; all blocks of all jobs batched together when :attr:`batched` says so."""
        outs: list[torch.Tensor] = []
        blocks: list[Block] = []
        for update, splits, group, logical in jobs:
            out = torch.empty_like(update)
            shapes = logical or [(n, update.shape[1]) for n in splits]
            for o_block, g_block, (rows, cols) in zip(
                out.split(splits, dim=0), update.split(splits, dim=0), shapes, strict=True
            ):
                blocks.append((g_block, o_block, muon_lr_scale(rows, cols, group["adjust_lr"]), group["ns_steps"]))
            outs.append(out)
        if blocks:
            orthogonalise_blocks(blocks, blocks[0][0].is_cuda if self.batched is None else self.batched)
        return outs

    def _momentum_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance ``p``'s momentum buffer by its gradient; the (Nesterov) update to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        return p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

    def _step_local(self, chunk: list[tuple[torch.Tensor, dict]], updates: list[torch.Tensor]) -> None:
        jobs = []
        for (p, group), update in zip(chunk, updates, strict=True):
            splits = group["splits"] or [p.shape[0]]
            jobs.append((update, splits, group, logical_blocks(p, splits, update.shape[1])))
        deltas = self.orthogonalised(jobs)
        _apply_updates([(p, d, g["lr"], g["weight_decay"]) for (p, g), d in zip(chunk, deltas, strict=True)])

    def _launch_owned(self, chunk: list[tuple[torch.Tensor, dict]], updates: list[torch.Tensor], par: Any) -> list:
        """The owners orthogonalise their whole (TP-gathered) matrices, batched, and broadcast them to their DP peers
        (async); ``(p, delta, work, lr, wd)`` per matrix."""
        fulls = [_gather_full(u, p, par, g["splits"]) for (p, g), u in zip(chunk, updates, strict=True)]
        mine = [i for i, (p, _) in enumerate(chunk) if self._owners[id(p)] == par.dp_rank]
        jobs = []
        for i in mine:
            (full, splits), (p, group) = fulls[i], chunk[i]
            jobs.append((full, splits, group, logical_blocks(p, splits, full.shape[1], par.tp_size)))
        deltas = dict(zip(mine, self.orthogonalised(jobs), strict=True))
        out = []
        for i, (p, group) in enumerate(chunk):
            delta = deltas[i] if i in deltas else torch.empty_like(fulls[i][0])
            work = None
            if par.dp_size > 1:
                src = par.layout.rank_of(self._owners[id(p)], par.tp_rank)
                work = dist.broadcast(delta, src=src, group=par.dp_group, async_op=True)
            out.append((p, delta, work, group["lr"], group["weight_decay"]))
        return out

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
        entries = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        tp = par.tp_size if distributed else 1
        # chunks of a bounded number of matrices, the same on every rank (one collective order). Distributed: chunk
        # i's broadcasts are in flight while chunk i + 1 is orthogonalised, then waited for and applied, so at most
        # two chunks of whole-matrix results are alive at a time (not one result per matrix of the step)
        in_flight: list = []
        for chunk in _chunks(entries, NS_BATCH_NUMEL, lambda e: _full_numel(e[0], tp)):
            updates = [self._momentum_update(p, group) for p, group in chunk]
            if distributed:
                launched = self._launch_owned(chunk, updates, par)
                _finish(in_flight, par)
                in_flight = launched
            else:
                self._step_local(chunk, updates)
        _finish(in_flight, par)
        return loss


def _finish(launched: list, par: Any) -> None:
    """Wait for the broadcasts of one launched chunk and apply its results (``launched`` is emptied, so the caller
    holds no reference to them afterwards). Each parameter's update is the same whole-tensor op as ever."""
    for _, _, work, _, _ in launched:
        if work is not None:
            work.wait()
    _apply_updates([(p, _local_shard(delta, p, par), lr, wd) for p, delta, _, lr, wd in launched])
    launched.clear()


def _chunks(items: list, cap: int, numel: Callable[[Any], int]) -> list[list]:
    """Consecutive runs of ``items`` of at most ``cap`` elements each (at least one item a run)."""
    out: list[list] = [[]]
    size = 0
    for item in items:
        n = numel(item)
        if out[-1] and size + n > cap:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return [c for c in out if c]


def _apply_updates(items: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> None:
    """``W <- W * (1 - lr * wd) - lr * delta`` for each ``(W, delta, lr, wd)``: one foreach pair per (lr, wd) (on
    CPU, foreach ops run the per-tensor ``mul_`` / ``add_`` one by one: the same floats as a loop)."""
    by_hyper: dict[tuple[float, float], tuple[list, list]] = {}
    for p, delta, lr, wd in items:
        ps, ds = by_hyper.setdefault((lr, wd), ([], []))
        ps.append(p)
        ds.append(delta)
    for (lr, wd), (ps, ds) in by_hyper.items():
        torch._foreach_mul_(ps, 1.0 - lr * wd)
        torch._foreach_add_(ps, ds, alpha=-lr)


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
    """PyTorch's AdamW, or apex's FusedAdam (AdamW mode) with ``optimizer.adamw_impl = apex`` where it can run.

    PyTorch's is fused (one kernel for all parameters) when they are all on CUDA, else foreach: on CPU the foreach
    ops run the single-tensor loop's ops one tensor at a time, the same floats (tests/optim checks it bit for bit).
    """
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if getattr(cfg, "adamw_impl", "torch") == "apex":
        from megatron_dual.model.apex_ops import apex_fused_adam

        fused = apex_fused_adam(on_cuda)
        if fused is not None:
            return fused(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, adam_w_mode=True)
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return keep_implementation(torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl))


IMPLEMENTATION_KEYS = ("foreach", "fused")  # param-group flags of PyTorch's optimizers that pick the kernels


def keep_implementation(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Loaded state keeps this run's implementation flags: the saved param groups carry ``foreach`` / ``fused`` and
    would override them (a checkpoint from a CPU run would turn a GPU run's fused AdamW into foreach, one from an
    older run into the single-tensor loop; the load also reads them to place the step counts on the device)."""
    live = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in opt.param_groups]

    def pre_hook(_: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = state_dict["param_groups"]
        return {
            **state_dict,
            "param_groups": [dict(g, **live[i]) if i < len(live) else g for i, g in enumerate(groups)],
        }

    opt.register_load_state_dict_pre_hook(pre_hook)
    return opt


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
