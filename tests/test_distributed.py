"""bnlab.distributed: the collectives of a data-parallel run, in a gloo group of 2 spawned CPU
processes (one group for the module, ``tests.distributed``), and its checks of the world."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab import distributed
from bnlab.distributed import World, check_world, env_world
from bnlab.errors import UsageError
from bnlab.nn import BatchNorm2d, SyncBatchNorm
from bnlab.nn.syncbn import local_statistics
from bnlab.precise_bn import pool_over_ranks, precise_bn_copy
from tests.distributed import failures, run_checks


def _world(rank: int, size: int) -> World:
    return World(rank, size, rank, size)


def check_a_refusal_on_one_rank_ends_every_rank(rank: int, size: int) -> None:
    world = _world(rank, size)
    distributed.agree(world, None)  # nobody refuses: nothing happens
    mine = UsageError("batch_size=3 is bad") if rank == 1 else None
    with pytest.raises(UsageError, match=r"^batch_size=3 is bad$"):
        distributed.agree(world, mine)


def check_from_main_runs_on_rank_0_and_shares_its_answer(rank: int, size: int) -> None:
    world, calls = _world(rank, size), []

    def look() -> dict:
        calls.append(rank)
        return {"status": "completed", "rank": rank}

    assert distributed.from_main(world, look) == {"status": "completed", "rank": 0}
    assert calls == ([0] if rank == 0 else [])

    def refuse() -> None:
        raise UsageError("run dir in use")

    with pytest.raises(UsageError, match="run dir in use"):
        distributed.from_main(world, refuse)


def check_host_sync_is_the_global_batchs_and_the_same_everywhere(rank: int, size: int) -> None:
    world = _world(rank, size)
    # per-step [loss, correct] of this rank's shard; a NaN loss on rank 0 at the second step
    values = torch.tensor([[1.0 + rank, 3.0], [float("nan") if rank == 0 else 2.0, 4.0 + rank]])
    out, signum = distributed.gather_sync(world, values, [])
    assert signum == 0
    assert out[0].tolist() == [1.5, 6.0] and out[1, 1].item() == 9.0
    assert torch.isnan(out[1, 0])  # diverged on every rank, at the same step
    a, b = distributed.gather_objects(world, out)  # bit for bit, NaN where NaN
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    # a SIGTERM that reached rank 1 only stops both
    _, signum = distributed.gather_sync(world, torch.zeros(0, 2), [15] if rank == 1 else [])
    assert signum == 15


def check_buffers_of_per_process_norms_are_averaged(rank: int, size: int) -> None:
    world = _world(rank, size)
    model = nn.Sequential(BatchNorm2d(3), nn.BatchNorm1d(2), SyncBatchNorm(3))
    with torch.no_grad():
        for m in model:
            m.running_mean.fill_(rank + 1.0)
            m.running_var.fill_(2.0 * (rank + 1))
    distributed.average_buffers(world, model)
    for m in model[:2]:
        assert torch.equal(m.running_mean, torch.full_like(m.running_mean, 1.5))
        assert torch.equal(m.running_var, torch.full_like(m.running_var, 3.0))
        assert m.num_batches_tracked.item() == 0
    # SyncBN's are global already: left as they are
    assert torch.equal(model[2].running_mean, torch.full((3,), rank + 1.0))


def check_precise_bn_pools_over_ranks(rank: int, size: int) -> None:
    """Each rank re-estimates from its shards of the batches; pooled, the statistics are the
    whole batches' (SyncBN: every layer sees what one process would)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SyncBatchNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          SyncBatchNorm(4)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64) + 2 for _ in range(3)]
    shards = [b[:2] if rank == 0 else b[2:] for b in batches]  # unequal shards
    pooled = precise_bn_copy(model, iter(shards), 3, pool_over_ranks(_world(rank, size)))
    with local_statistics():
        whole = precise_bn_copy(model, iter(batches), 3)
    for name in ("1", "4"):
        for buffer in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(pooled.get_submodule(name), buffer),
                                       getattr(whole.get_submodule(name), buffer))


def check_rank_0_keeps_the_one_process_rng_stream(rank: int, size: int) -> None:
    torch.manual_seed(7)
    distributed.seed_rank(7, _world(rank, size))
    draw = torch.rand(4)
    torch.manual_seed(7)
    alone = torch.rand(4)
    assert torch.equal(draw, alone) == (rank == 0)
    draws = distributed.gather_objects(_world(rank, size), draw)
    assert not torch.equal(draws[0], draws[1])


CHECKS = {
    "agree": check_a_refusal_on_one_rank_ends_every_rank,
    "from_main": check_from_main_runs_on_rank_0_and_shares_its_answer,
    "gather_sync": check_host_sync_is_the_global_batchs_and_the_same_everywhere,
    "average_buffers": check_buffers_of_per_process_norms_are_averaged,
    "precise_bn": check_precise_bn_pools_over_ranks,
    "seed_rank": check_rank_0_keeps_the_one_process_rng_stream,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_checks(__name__, list(CHECKS), tmp_path_factory.mktemp("distributed"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_in_two_processes(outcomes: list[dict], name: str) -> None:
    assert not failures(outcomes, name)


# -- the world a launcher made, and what it must fit ---------------------------------------------


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives rank 1 of 2 on one machine."""
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)


def test_env_world_reads_the_launchers_environment(launched: None) -> None:
    assert env_world() == World(rank=1, size=2, local_rank=1, local_size=2)
    assert not env_world().main
    assert distributed.rank_overrides(env_world()) == list(distributed.QUIET_RANK_OVERRIDES)


def test_alone_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world() == World() and env_world().main
    assert distributed.rank_overrides(env_world()) == []


@pytest.mark.parametrize(("batch", "nproc", "norm", "message"), [
    (15, 1, None, r"batch_size=15 is not divisible by the world size \(2 processes\)"),
    (16, 4, None, r"dist.nproc=4 disagrees with the launcher, which started 2 processes"),
    (2, 1, "custom", r"batch_size=2 over 2 processes gives each 1 sample, and norm=custom"),
])
def test_the_launchers_world_must_fit_the_batch(launched: None, batch: int, nproc: int,
                                               norm: str | None, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_world(batch, nproc, norm)


@pytest.mark.parametrize(("batch", "nproc"), [(16, 2), (16, 1), (2, 2)])
def test_a_fitting_world_passes(launched: None, batch: int, nproc: int) -> None:
    check_world(batch, nproc, None)  # (2, 2): one sample each, for a norm that pools (sync)
