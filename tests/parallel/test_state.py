import re
from fractions import Fraction

import pytest

from megatron_dual.config import ALPHA_MAX_DENOMINATOR, ConfigError, load_config
from megatron_dual.objectives import AR, MD, ObjectiveSchedule
from megatron_dual.parallel.state import (
    ParallelState,
    check_alpha,
    dist_env,
    objective_ranks,
    rank_layout,
    realisable_alphas,
)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8, 12, 16, 64, 256])
def test_every_rank_is_in_exactly_one_group_of_each_kind(world):
    for tp in [t for t in range(1, world + 1) if world % t == 0]:
        lay = rank_layout(world, tp)
        assert lay.dp * lay.tp == world
        for groups, size in ((lay.tp_groups, tp), (lay.dp_groups, lay.dp)):
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world)) and all(len(g) == size for g in groups)
        for r in range(world):
            assert r in lay.tp_groups[lay.dp_rank(r)] and r in lay.dp_groups[lay.tp_rank(r)]
            assert lay.rank_of(lay.dp_rank(r), lay.tp_rank(r)) == r
        # TP peers are consecutive ranks (one node when tp <= GPUs per node)
        assert all(g == tuple(range(g[0], g[0] + tp)) for g in lay.tp_groups)


@pytest.mark.parametrize(
    "world,tp,alpha,slots", [(4, 1, 0.75, 1), (4, 2, 0.5, 1), (8, 2, 0.75, 2), (256, 1, 63 / 64, 1), (16, 4, 0.25, 1)]
)
def test_objective_groups_tp_peers_share_and_alpha_is_exact(world, tp, alpha, slots):
    lay = rank_layout(world, tp)
    sched = ObjectiveSchedule(alpha, lay.dp, slots)
    seen = {r: set() for r in range(lay.dp)}
    for step in range(sched.total):
        n_ar = 0
        for slot in range(slots):
            groups = objective_ranks(lay, sched, step, slot)
            assert sorted(groups[AR] + groups[MD]) == list(range(world))
            for tp_group in lay.tp_groups:  # all TP peers run the same objective
                assert set(tp_group) <= set(groups[AR]) or set(tp_group) <= set(groups[MD])
            n_ar += len(groups[AR]) // tp
            for d in range(lay.dp):
                seen[d].add(sched.objective(d, slot, step))
        assert Fraction(n_ar, lay.dp * slots) == Fraction(alpha).limit_denominator(ALPHA_MAX_DENOMINATOR)
    if 0 < alpha < 1:  # rotation: every DP rank runs both objectives over one period
        assert all(s == {AR, MD} for s in seen.values())


def test_errors_name_values_and_suggest_layouts():
    with pytest.raises(
        ConfigError,
        match=r"parallel.tp = 4 does not divide the world size 6; allowed tp for 6 "
        r"ranks: 1, 2, 3, 6",
    ):
        rank_layout(6, 4)
    with pytest.raises(ConfigError) as e:
        check_alpha(0.3, 4, 2)
    msg = str(e.value)
    assert "nearest realisable: 2/8 = 0.25, 3/8 = 0.375" in msg
    assert "multiple of 10" in msg and "train.grad_accum = 5" in msg and "10 DP ranks x 1 slot" in msg
    assert realisable_alphas(2, 2) == [Fraction(k, 4) for k in range(5)]
    with pytest.raises(ConfigError, match="outside the world"):
        ParallelState(4, 4)


def test_single_process_state_and_objectives():
    st = ParallelState(1, 0, 1, alpha=0.75, slots=4)
    assert st.tp_group is None and st.dp_group is None and st.dp_size == 1
    assert sorted(st.objectives(0)) == [AR, AR, AR, MD]
    assert "alpha = 3/4 = 3 AR + 1 MD of 4 global slots" in st.describe()
    st4 = ParallelState(8, 5, tp=2, alpha=0.5, slots=1)
    assert (st4.dp_rank, st4.tp_rank, st4.dp_size) == (2, 1, 4)


def test_config_checks_alpha_against_the_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(preset="tiny", overrides=["train.grad_accum=1", "objective.alpha=3/4"])
    assert cfg.train.grad_accum == 1
    with pytest.raises(ConfigError, match=r"with 4 data-parallel ranks\) = 0.3"):
        load_config(preset="tiny", overrides=["train.grad_accum=1", "objective.alpha=0.3"])
    with pytest.raises(ConfigError, match="parallel.tp = 3 does not divide the world size 4"):
        load_config(
            preset="tiny",
            overrides=[
                "parallel.tp=3",
                "model.n_heads=3",
                "model.hidden_size=132",
                "model.intermediate_size=345",
                "model.vocab_size=4095",
                "objective.alpha=2/3",
                "train.grad_accum=3",
            ],
        )
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK")
    with pytest.raises(ConfigError, match="must divide model.n_heads = 4"):
        load_config(preset="tiny", overrides=["parallel.tp=8"])


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "1"}, "RANK = 1 but WORLD_SIZE is not set"),  # ran as a single process, rank 0
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE = 'abc': expected an integer"),  # ignored: one process
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK = 'x': expected an integer"),  # "invalid literal for int()"
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK = 5 is outside WORLD_SIZE = 2"),  # waited parallel.timeout
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE = 2 but RANK is not set"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE = 0"),  # "n_ranks = 0 and n_slots = 4 ..."
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "2"}, "SLURM_PROCID = 2 is outside SLURM_NTASKS = 2"),
        ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS = 4 but SLURM_PROCID is not set"),
    ],
)
def test_launch_environment_that_cannot_be_a_launch_is_one_line_naming_the_variable(monkeypatch, env, message):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(preset="tiny", overrides=["train.grad_accum=4"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        dist_env()


def test_launch_environment_read_as_before(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == (0, 0, 1)
    monkeypatch.setenv("RANK", "0")  # a stale RANK=0 agrees with one process
    assert dist_env() == (0, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (3, 1, 4)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert dist_env() == (7, 3, 8)
