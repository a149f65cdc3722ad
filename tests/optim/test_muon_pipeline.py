"""Distributed Muon applies each chunk's results once its broadcasts are done: the same parameters bit for bit as
applying all of them at the end of the step (the previous schedule), with at most the previous chunk's results
alive while a chunk is launched (2 gloo ranks: DP owners, TP shards)."""

from __future__ import annotations

import time
import weakref

import torch
from test_batched import _full_params, _grads, _muon, _shard

from megatron_dual.optim import muon as muon_mod
from megatron_dual.parallel.testing import run_distributed

CHUNK_NUMEL = 200  # the whole matrices (16x12, 12x10, 6x9, 12x12) fall into 3 chunks: [192], [120, 54], [144]


@torch.no_grad()
def _step_applying_at_end(opt: muon_mod.Muon) -> None:
    """The schedule before: every chunk launched, then all broadcasts waited for and all results applied."""
    par = opt._parallel
    if opt._owners is None:
        opt._owners = opt._assign_owners()
    entries = [(p, g) for g in opt.param_groups for p in g["params"] if p.grad is not None]
    pending = []
    for chunk in muon_mod._chunks(entries, muon_mod.NS_BATCH_NUMEL, lambda e: muon_mod._full_numel(e[0], par.tp_size)):
        pending += opt._launch_owned(chunk, [opt._momentum_update(p, g) for p, g in chunk], par)
    for _, _, work, _, _ in pending:
        if work is not None:
            work.wait()
    muon_mod._apply_updates([(p, muon_mod._local_shard(d, p, par), lr, wd) for p, d, _, lr, wd in pending])


def _spy(opt: muon_mod.Muon, trace: dict, settle: bool) -> None:
    """Record, at each chunk's launch, the elements of earlier chunks' results still alive, and each chunk's size.

    gloo's worker thread may drop its reference to a finished broadcast's tensor a moment after ``wait`` returns:
    with ``settle`` the count is taken once it is down to the previous chunk of the step (what the pipelined step
    holds itself), or after 2 s."""
    launch, refs = opt._launch_owned, []

    def live() -> int:
        return sum(r().numel() for r in refs if r() is not None)

    def spied(chunk, updates, par):
        deadline = time.monotonic() + 2.0
        while settle and live() > trace["expect"] and time.monotonic() < deadline:
            time.sleep(0.005)
        trace["live"].append(live())
        out = launch(chunk, updates, par)
        refs.extend(weakref.ref(delta) for _, delta, _, _, _ in out)
        trace["chunk"].append(sum(delta.numel() for _, delta, _, _, _ in out))
        trace["expect"] = trace["chunk"][-1]
        return out

    opt._launch_owned = spied
    trace["refs"] = refs


def _run(rank: int, tp: int, pipelined: bool) -> tuple[list[torch.Tensor], dict]:
    from megatron_dual.parallel.state import ParallelState

    par = ParallelState(2, rank, tp=tp)
    params = [torch.nn.Parameter(_shard(t, i, par.tp_rank, tp)) for i, t in enumerate(_full_params())]
    for i, p in enumerate(params[:2]):
        if tp > 1:
            p.tensor_parallel_dim = i
            p.tensor_parallel_splits = [8, 4, 4] if i == 0 else None
    opt = _muon(params, tp).distribute(par)
    trace: dict = {"live": [], "chunk": []}
    _spy(opt, trace, settle=pipelined)
    for step in range(2):
        for i, (p, g) in enumerate(zip(params, _grads(10 + step), strict=False)):
            p.grad = _shard(g, i, par.tp_rank, tp)
        trace["expect"] = 0  # nothing of the last step's is held into this one
        opt.step() if pipelined else _step_applying_at_end(opt)
    deadline = time.monotonic() + 2.0
    while any(r() is not None for r in trace["refs"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    trace["alive_after"] = sum(r() is not None for r in trace.pop("refs"))
    trace.pop("expect")
    return [p.detach().clone() for p in params], trace


def _rank_worker(rank: int, world: int) -> dict:
    muon_mod.NS_BATCH_NUMEL = CHUNK_NUMEL
    return {(tp, pipe): _run(rank, tp, pipe) for tp in (1, 2) for pipe in (True, False)}


def test_distributed_muon_applies_chunk_by_chunk_with_the_same_floats():
    for res in run_distributed(_rank_worker, 2):
        for tp in (1, 2):
            (got, trace), (want, before) = res[(tp, True)], res[(tp, False)]
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), tp
            sizes = trace["chunk"][:3]
            assert len(trace["chunk"]) == 6 and sizes == [192, 174, 144], trace  # 3 chunks a step, 2 steps
            # at each launch only the previous chunk's results are alive (before: every earlier chunk of the step)
            assert trace["live"] == [0, 192, 174] * 2, trace
            assert before["live"][1] >= 192 and before["live"][2] >= 366, before
            assert trace["alive_after"] == 0
