"""bnlab.nn.SyncBatchNorm: in a gloo group of 2 CPU processes, each process's share equals one
torch BatchNorm on the concatenated batch in float64 (outputs, input grads, parameter grads
summed over processes, running statistics), for unequal and empty shards and 1-d/2-d/3-d
inputs; eval and ``local_statistics`` use no collective; alone (no process group) it is
BatchNorm. The spawned checks run in one group per module (``tests.distributed``)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnlab.nn as bnn
from bnlab.nn import SyncBatchNorm, convert_batchnorm
from bnlab.nn.syncbn import global_batch_stats, local_statistics
from tests.distributed import failures, run_checks

F64 = torch.float64
C = 3
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _seeded(layer: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial parameters and running statistics, the same on every process."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=F64) + 0.5)
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(C, generator=gen, dtype=F64))
            layer.running_var.copy_(torch.rand(C, generator=gen, dtype=F64) + 0.5)


@contextlib.contextmanager
def no_collectives() -> Iterator[None]:
    """Any collective inside the block raises (instead of waiting for the other process)."""
    names = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor")
    saved = {n: getattr(dist, n) for n in names}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a collective was called")

    try:
        for n in names:
            setattr(dist, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


def _gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def _grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    inputs = [x, *(p for p in (module.weight, module.bias) if p is not None)]
    return y, list(torch.autograd.grad(y, inputs, g))


def check_full_batch(rank: int, world: int, spatial: tuple[int, ...], sizes: tuple[int, ...],
                     offset: float = 0.0, **kwargs: object) -> None:
    """Two training steps and an eval step of SyncBN on this rank's shard against torch's BN on
    the whole batch."""
    gen = torch.Generator().manual_seed(0)
    ours = SyncBatchNorm(C, dtype=F64, **kwargs)
    _seeded(ours, gen)
    ref = TORCH_BN[2 + len(spatial)](C, dtype=F64, **kwargs)
    ref.load_state_dict(ours.state_dict())
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for _ in range(2):
        x = torch.randn(sum(sizes), C, *spatial, generator=gen, dtype=F64) * 2 + offset
        g = torch.randn(x.shape, generator=gen, dtype=F64)
        y_ref, grads_ref = _grads(ref, x, g)
        y, grads = _grads(ours, x[lo:hi], g[lo:hi])
        torch.testing.assert_close(y, y_ref[lo:hi], msg="output")
        torch.testing.assert_close(grads[0], grads_ref[0][lo:hi], msg="input grad")
        if len(grads) > 1:  # each rank's share of the parameter grads, summed as DDP does
            summed = torch.cat(grads[1:])
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, torch.cat(grads_ref[1:]), msg="param grads")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            mine, theirs = getattr(ours, name), getattr(ref, name)
            assert (mine is None) == (theirs is None), name
            if mine is not None:
                torch.testing.assert_close(mine, theirs, msg=name)
                copies = _gathered(mine, world)
                assert all(torch.equal(c, copies[0]) for c in copies), f"{name} differs"
    ours.eval()
    ref.eval()
    x = torch.randn(sum(sizes), C, *spatial, generator=gen, dtype=F64) + offset
    with no_collectives():
        y = ours(x[lo:hi])
    # without running statistics eval normalizes each process's batch on its own, as torch
    expected = ref(x)[lo:hi] if ours.track_running_stats else ref(x[lo:hi])
    torch.testing.assert_close(y, expected, msg="eval output")


SHARD_CASES = {
    "1d-NC-3+5": dict(spatial=(), sizes=(3, 5)),
    "1d-NC-1+4": dict(spatial=(), sizes=(1, 4)),  # one value per channel on rank 0
    "1d-NC-0+6": dict(spatial=(), sizes=(0, 6), track_running_stats=True),  # an empty shard
    "1d-NCL-2+3": dict(spatial=(5,), sizes=(2, 3)),
    "2d-3+1": dict(spatial=(4, 3), sizes=(3, 1)),
    "2d-6+0": dict(spatial=(2, 2), sizes=(6, 0)),
    "3d-2+1": dict(spatial=(2, 3, 2), sizes=(2, 1)),
    "2d-momentum-None": dict(spatial=(3, 3), sizes=(2, 4), momentum=None),
    "2d-no-affine": dict(spatial=(3, 3), sizes=(4, 2), affine=False),
    "2d-no-bias": dict(spatial=(3, 3), sizes=(4, 2), bias=False),
    "2d-untracked": dict(spatial=(3, 3), sizes=(4, 2), track_running_stats=False),
    "1d-NCL-large-mean": dict(spatial=(4,), sizes=(3, 2), offset=1e3),
}


def check_one_value_in_all_raises_everywhere(rank: int, world: int) -> None:
    layer = SyncBatchNorm(C)
    x = torch.randn(1 if rank == 0 else 0, C)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)


def check_all_empty_is_bn_of_an_empty_batch(rank: int, world: int) -> None:
    layer = SyncBatchNorm(C)
    x = torch.randn(0, C, 4, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(C))
    assert torch.equal(layer.running_mean, torch.zeros(C)) and layer.num_batches_tracked == 1


def check_local_statistics_is_bn_on_one_process(rank: int, world: int) -> None:
    """Only rank 0 runs: a collective would wait forever (here: raise)."""
    if rank == 0:
        gen = torch.Generator().manual_seed(3)
        ours, ref = SyncBatchNorm(C, dtype=F64), nn.BatchNorm2d(C, dtype=F64)
        _seeded(ours, gen)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(4, C, 3, 3, dtype=F64, generator=gen)
        g = torch.randn(x.shape, dtype=F64, generator=gen)
        with no_collectives(), local_statistics():
            y, grads = _grads(ours, x, g)
        y_ref, grads_ref = _grads(ref, x, g)
        torch.testing.assert_close(y, y_ref)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    dist.barrier()


def check_float32_large_mean_does_not_cancel(rank: int, world: int) -> None:
    """|mean| / std = 1e4 in float32: sums of squares in float32 would cancel completely
    (1e8 - 1e8 at 7 digits); the merge of two-pass moments in float64 keeps the variance."""
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(40, C, 8, generator=gen, dtype=F64) + 1e4
    x = full.float()[:16] if rank == 0 else full.float()[16:]
    _, var, count = global_batch_stats(x, dist.group.WORLD)
    exact = full.float().double().var((0, 2), correction=0)
    assert count == 40 * 8
    torch.testing.assert_close(var.double(), exact, rtol=1e-4, atol=0)


def check_channels_last_and_bfloat16(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(6, C, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    shard = full[:2] if rank == 0 else full[2:]
    layer, ref = SyncBatchNorm(C), nn.BatchNorm2d(C)
    y = layer(shard)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(full)[:2] if rank == 0 else ref(full)[2:])
    y16 = layer(shard.bfloat16())
    assert y16.dtype == torch.bfloat16
    expected = ref(full.bfloat16().float())
    torch.testing.assert_close(y16.float(), expected[:2] if rank == 0 else expected[2:],
                               rtol=2e-2, atol=2e-2)


def check_under_ddp_grads_are_the_full_batch_grads(rank: int, world: int) -> None:
    """SyncBN in a DistributedDataParallel model (its backward all_reduce interleaves with
    DDP's gradient buckets): the averaged grads equal one model's on the whole batch."""
    def net(bn2d: type[nn.Module], bn1d: type[nn.Module]) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, 6, bias=False), bn1d(6),
                             nn.Linear(6, 2)).double()

    model, single = net(SyncBatchNorm, SyncBatchNorm), net(nn.BatchNorm2d, nn.BatchNorm1d)
    single.load_state_dict(model.state_dict())  # the same keys: checkpoints load either way
    ddp = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, 6, 6, generator=gen, dtype=F64)
    ddp(x[rank * 4:(rank + 1) * 4]).square().mean().backward()
    single(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for a, b in zip(model.buffers(), single.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def check_double_backward_is_refused(rank: int, world: int) -> None:
    layer = SyncBatchNorm(C, dtype=F64)
    x = torch.randn(3, C, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|twice"):
        gx.sum().backward()


CHECKS = {
    **{f"full_batch[{name}]": functools.partial(check_full_batch, **case)
       for name, case in SHARD_CASES.items()},
    "one_value_in_all_raises_everywhere": check_one_value_in_all_raises_everywhere,
    "all_empty": check_all_empty_is_bn_of_an_empty_batch,
    "local_statistics": check_local_statistics_is_bn_on_one_process,
    "float32_large_mean": check_float32_large_mean_does_not_cancel,
    "channels_last_and_bfloat16": check_channels_last_and_bfloat16,
    "ddp_grads": check_under_ddp_grads_are_the_full_batch_grads,
    "double_backward": check_double_backward_is_refused,
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_checks(__name__, list(CHECKS), tmp_path_factory.mktemp("syncbn"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_in_two_processes(outcomes: list[dict], name: str) -> None:
    assert not failures(outcomes, name)


# -- one process, no process group: BatchNorm ---------------------------------------------------


@pytest.mark.parametrize("shape", [(5, C), (4, C, 6), (3, C, 4, 5), (2, C, 2, 3, 4)])
def test_without_a_process_group_it_is_batchnorm(shape: tuple[int, ...]) -> None:
    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(1)
    ours = SyncBatchNorm(C, dtype=F64)
    _seeded(ours, gen)
    ref = TORCH_BN[len(shape)](C, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    for _ in range(2):
        x = torch.randn(shape, generator=gen, dtype=F64)
        g = torch.randn(shape, generator=gen, dtype=F64)
        y, grads = _grads(ours, x, g)
        y_ref, grads_ref = _grads(ref, x, g)
        torch.testing.assert_close(y, y_ref)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict())
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_in_a_group_of_one_it_is_batchnorm(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        x = torch.randn(4, C, 3, dtype=F64)
        with no_collectives():
            y = SyncBatchNorm(C, dtype=F64)(x)
        torch.testing.assert_close(y, nn.BatchNorm1d(C, dtype=F64)(x))
    finally:
        dist.destroy_process_group()


def test_state_and_errors_are_torch_syncbatchnorms() -> None:
    ours, theirs = SyncBatchNorm(4, momentum=None, bias=False), nn.SyncBatchNorm(4, momentum=None,
                                                                                bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(nn.BatchNorm2d(4, bias=False).state_dict())
    for bad in (torch.zeros(4), torch.zeros(2, 0, 3)):
        with pytest.raises(ValueError) as mine:
            ours(bad)
        with pytest.raises(ValueError) as ref:
            theirs(bad)
        assert str(mine.value) == str(ref.value)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.zeros(1, 4))


def test_convert_batchnorm_to_sync_and_back() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bnn.BatchNorm1d(4),
                          nn.SyncBatchNorm(4), bnn.NoisyBatchNorm2d(4))
    weight, mean = model[1].weight, model[1].running_mean
    out = convert_batchnorm(model, to="sync")
    assert [type(m) for m in out[1:4]] == [SyncBatchNorm] * 3
    assert out[1].weight is weight and out[1].running_mean is mean
    assert type(out[4]) is bnn.NoisyBatchNorm2d  # subclasses are left alone
    back = convert_batchnorm(out, to="torch")
    assert [type(m) for m in back[1:4]] == [nn.SyncBatchNorm] * 3 and back[1].weight is weight
    assert [type(m) for m in convert_batchnorm(back, to="custom")[1:4]] == [SyncBatchNorm] * 3
