"""Our Muon + AdamW as one optimizer that DeepSpeed's ZeRO can hold, with Muon run on gathered whole matrices.

ZeRO 1/2/3 hand a client optimizer flat fp32 *partitions* of each param group (ZeRO 1/2: a contiguous slice of the
group's concatenated parameters; ZeRO-3: every parameter's own 1/dp slice, concatenated per sub-group), never whole
matrices, so Muon cannot run on what it is given. DeepSpeed's own Muon does not give our maths either (its update
scale is ``max(1, rows/cols)^0.5``, it orthogonalises fused q/k/v and up/gate as one matrix, clips the orthogonalised
update instead of the gradient, and trained as SGD at stage 0, DeepSpeed issue 8441), so
:class:`GatheredOrthogonalOptimizer` runs **ours**:

1. momentum (and Nesterov) elementwise on the local partition, as ZeRO shards the state;
2. the momentum-updated partitions rebuilt into whole matrices over the DP group, a bounded batch of matrices at a
   time (:class:`FlatLayout` knows where each parameter lies); TP shards gathered over the TP group;
3. each matrix orthogonalised by one owner DP rank (the assignment of our distributed Muon; an owner's matrices of
   a batch stacked by shape on CUDA), q/k/v and up/gate separately, lr-scaled by ``0.2 * sqrt(max(rows, cols))``
   (or the configured mode);
4. the owners' results summed over DP per batch (every other rank contributes zeros, so the sum is exact) and each
   rank applies its own partition: ``W <- W * (1 - lr * wd) - lr * update``.

AdamW is elementwise and runs on the partitions unchanged (PyTorch's AdamW, as the DDP engine). At stage 0 the
groups hold the real parameters and the step is exactly our :class:`~megatron_dual.optim.muon.Muon` (distributed)
and AdamW. The class name avoids "muon": DeepSpeed switches its own Muon paths on for optimizer classes so named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megatron_dual.optim.muon import Muon, _gather_full, _local_shard, keep_implementation, logical_blocks

__all__ = ["FlatLayout", "GatheredOrthogonalOptimizer"]


@dataclass
class FlatLayout:
    """Where the parameters of one flat partition lie over the DP group.

    Rank r holds elements ``[r * part, (r + 1) * part)`` of a virtual ``dp * part`` vector; ``segments[j]`` lists
    ``(start in that vector, length, start in parameter j's flattened elements)``, each inside one rank's range.
    Whole parameters are rebuilt batch by batch (:meth:`batches`): every rank writes the elements it holds into a
    zero buffer of the batch's whole parameters and the buffer is summed over DP, which is exact (each element has
    one holder, the others add zeros) and bounds the memory to one batch.
    """

    params: list[torch.nn.Parameter]
    part: int
    dp: int
    segments: list[list[tuple[int, int, int]]] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)

    def __post_init__(self) -> None:
        # ZeRO-3 leaves an empty tensor in .data; the logical shape is ds_shape
        self.shapes = self.shapes or [torch.Size(getattr(p, "ds_shape", p.shape)) for p in self.params]
        self.segments = [self._split(segs) for segs in self.segments]

    def _split(self, segs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Cut segments at rank boundaries (ZeRO 1/2 split a parameter across ranks anywhere)."""
        out = []
        for start, n, src in segs:
            while n > 0:
                take = min(n, (start // self.part + 1) * self.part - start)
                out.append((start, take, src))
                start, n, src = start + take, n - take, src + take
        return out

    @classmethod
    def contiguous(cls, params: list[torch.nn.Parameter], offsets: list[int], part: int, dp: int) -> FlatLayout:
        """ZeRO 1/2: the group's parameters concatenated at ``offsets``, the whole split evenly over ranks."""
        segs = [[(off, p.numel(), 0)] for p, off in zip(params, offsets, strict=True)]
        return cls(params, part, dp, segs)

    @classmethod
    def per_parameter(
        cls, params: list[torch.nn.Parameter], offsets: list[int], sizes: list[int], part: int, dp: int
    ) -> FlatLayout:
        """ZeRO-3: parameter j's rank-r slice ``[r * size_j, (r + 1) * size_j)`` at ``offsets[j]`` of rank r's
        partition."""
        segs = []
        for p, off, size in zip(params, offsets, sizes, strict=True):
            numel = getattr(p, "ds_numel", p.numel())
            segs.append(
                [(r * part + off, min(size, numel - r * size), r * size) for r in range(dp) if numel - r * size > 0]
            )
        return cls(params, part, dp, segs)

    def batches(self, max_numel: int) -> list[list[int]]:
        """Consecutive parameter indices, at most ``max_numel`` elements a batch (at least one parameter)."""
        out: list[list[int]] = [[]]
        size = 0
        for j, shape in enumerate(self.shapes):
            if out[-1] and size + shape.numel() > max_numel:
                out.append([])
                size = 0
            out[-1].append(j)
            size += shape.numel()
        return [b for b in out if b]

    def _offsets(self, batch: list[int]) -> list[int]:
        offs, total = [], 0
        for j in batch:
            offs.append(total)
            total += self.shapes[j].numel()
        return offs + [total]

    def gather(self, local: torch.Tensor, batch: list[int], rank: int, group: Any) -> list[torch.Tensor]:
        """The whole (TP-local) tensors of parameters ``batch`` from the ranks' partitions ``local``."""
        offs = self._offsets(batch)
        buf = torch.zeros(offs[-1], dtype=local.dtype, device=local.device)
        lo = rank * self.part
        for j, base in zip(batch, offs, strict=False):
            for start, n, src in self.segments[j]:
                if lo <= start < lo + self.part:
                    buf[base + src : base + src + n] = local[start - lo : start - lo + n]
        if self.dp > 1:
            dist.all_reduce(buf, group=group)
        return [buf[offs[i] : offs[i + 1]].view(self.shapes[j]) for i, j in enumerate(batch)]

    def scatter(
        self, values: dict[int, torch.Tensor], batch: list[int], rank: int, group: Any, out: torch.Tensor
    ) -> None:
        """Each rank's slice of the whole ``values`` (parameter index -> tensor, given on one rank each) into
        ``out``, this rank's partition."""
        offs = self._offsets(batch)
        buf = torch.zeros(offs[-1], dtype=out.dtype, device=out.device)
        for i, j in enumerate(batch):
            if j in values:
                buf[offs[i] : offs[i + 1]] = values[j].reshape(-1)
        if self.dp > 1:
            dist.all_reduce(buf, group=group)
        lo = rank * self.part
        for j, base in zip(batch, offs, strict=False):
            for start, n, src in self.segments[j]:
                if lo <= start < lo + self.part:
                    out[start - lo : start - lo + n] = buf[base + src : base + src + n]


class GatheredOrthogonalOptimizer(torch.optim.Optimizer):
    """``muon`` (our Muon, configured) and ``adamw`` (PyTorch's AdamW) as one optimizer; groups carry ``kind``.

    ``layouts`` (id of a flat partition -> :class:`FlatLayout`) is filled by the engine once ZeRO has built its
    partitions; a Muon tensor without a layout is a real parameter (stage 0) and takes our Muon's own step.
    """

    def __init__(
        self, muon: Muon | None, adamw: torch.optim.Optimizer, parallel: Any, gather_numel: int = 1 << 26
    ) -> None:
        groups = [dict(g, kind="muon") for g in (muon.param_groups if muon is not None else [])]
        groups += [dict(g, kind="adamw") for g in adamw.param_groups]
        super().__init__(groups, {})
        keep_implementation(self)  # the AdamW groups' foreach / fused flags survive a resume
        self._parallel = parallel
        self.layouts: dict[int, FlatLayout] = {}
        self.gather_numel = gather_numel  # elements of whole matrices rebuilt at a time (at least one matrix)
        self._adamw = adamw
        self._adamw.param_groups = [g for g in self.param_groups if g["kind"] == "adamw"]
        self._adamw.state = self.state
        self._muon = muon
        self.owners: dict[int, int] = {}
        if muon is not None:
            muon.param_groups = [g for g in self.param_groups if g["kind"] == "muon"]
            muon.state = self.state
            muon.distribute(parallel)
            self.owners = muon._assign_owners()  # on the real parameters, before ZeRO replaces them

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._adamw.state = self.state
        if self._muon is not None:
            self._muon.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        muon_groups = [g for g in self.param_groups if g["kind"] == "muon"]
        real = [g for g in muon_groups if not any(id(t) in self.layouts for t in g["params"])]
        if real and self._muon is not None:
            self._muon.param_groups = real
            self._muon.step()
        for group in muon_groups:
            for t in group["params"]:
                if id(t) in self.layouts and t.grad is not None:
                    self._flat_muon_step(t, group, self.layouts[id(t)])
        self._adamw.param_groups = [g for g in self.param_groups if g["kind"] == "adamw"]
        self._adamw.step()
        return loss

    def _flat_muon_step(self, t: torch.Tensor, group: dict[str, Any], layout: FlatLayout) -> None:
        par = self._parallel
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        state = self.state[t]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(t.grad)
        buf = state["momentum_buffer"]
        buf.mul_(mom).add_(t.grad)
        update = t.grad.add(buf, alpha=mom) if group["nesterov"] else buf
        delta = torch.zeros_like(t)
        for batch in layout.batches(self.gather_numel):
            whole = layout.gather(update, batch, par.dp_rank, par.dp_group)
            mine = [
                (j, u) for j, u in zip(batch, whole, strict=True) if self.owners[id(layout.params[j])] == par.dp_rank
            ]
            jobs = []
            for j, u in mine:
                p = layout.params[j]
                full, splits = _gather_full(u, p, par, group["splits"])
                jobs.append((full, splits, group, logical_blocks(p, splits, full.shape[1], par.tp_size)))
            # this owner's matrices of the batch orthogonalised together (stacked by shape on CUDA)
            outs = self._muon.orthogonalised(jobs)
            owned = {j: _local_shard(o, layout.params[j], par) for (j, _), o in zip(mine, outs, strict=True)}
            layout.scatter(owned, batch, par.dp_rank, par.dp_group, delta)
        t.mul_(1.0 - lr * wd)
        t.add_(delta, alpha=-lr)
