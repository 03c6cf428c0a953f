"""The statistics interface of the norm layers (``bnlab.nn.stats``): which layers have it, what
each reports, and that Precise BN and the ``bnstats/`` probe need nothing else, also for a layer
without a mean statistic (as EvoNorm B0 will be)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab.nn.functional import batch_stats
from bnlab.nn.stats import (
    BatchStatistics,
    NormStatistics,
    batch_statistics_layers,
    statistics_of,
)
from bnlab.precise_bn import precise_bn_copy
from bnlab.probes.bnstats import running_stats_layers, stats_mismatch

F64 = torch.float64

PER_CHANNEL = {
    "torch": nn.BatchNorm2d, "torch-sync": nn.SyncBatchNorm, "custom": bnn.BatchNorm2d,
    "custom-1d": bnn.BatchNorm1d, "custom-3d": bnn.BatchNorm3d, "noisy": bnn.NoisyBatchNorm2d,
    "renorm": bnn.BatchRenorm2d,
    "ghost": functools.partial(bnn.GhostBatchNorm2d, virtual_batch_size=2),
}


def _input(dims: int = 2) -> Tensor:
    shape = {1: (8, 4), 2: (8, 4, 3, 3), 3: (4, 4, 2, 3, 3)}[dims]
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 1


@pytest.mark.parametrize("name", list(PER_CHANNEL))
def test_per_channel_layers_report_batch_stats_and_their_buffers(name: str) -> None:
    layer = PER_CHANNEL[name](4, eps=1e-3)
    with torch.no_grad():
        layer.running_mean.uniform_()
        layer.running_var.uniform_(1, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    stats = statistics_of(layer)
    assert isinstance(stats, BatchStatistics)
    x = _input(1 if name == "custom-1d" else 3 if name == "custom-3d" else 2)
    batch = stats.batch_statistics(x)
    mean, var = batch_stats(x)
    assert torch.equal(batch.mean, mean) and torch.equal(batch.var, var)
    assert batch.eps == 1e-3 and not batch.whitens
    running = stats.running_statistics()
    assert running.mean is layer.running_mean and running.var is layer.running_var
    assert torch.equal(running.variance_plus_eps(), layer.running_var.double() + 1e-3)
    for key, value in layer.state_dict().items():  # reporting moves nothing
        assert torch.equal(value, before[key]), key
    stats.load_population_statistics(torch.full((4,), 0.5, dtype=F64),
                                      torch.full((4,), 3.0, dtype=F64))
    assert layer.running_mean.tolist() == [0.5] * 4 and layer.running_var.tolist() == [3.0] * 4
    assert layer.num_batches_tracked == 0


def test_without_running_statistics_and_without_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bnn.BatchNorm2d(4, track_running_stats=False),
                          nn.BatchNorm2d(4, track_running_stats=False), bnn.GroupNorm(2, 4),
                          nn.GroupNorm(2, 4), nn.Identity(), bnn.GhostBatchNorm2d(4),
                          bnn.DecorrelatedBatchNorm2d(4))
    assert list(batch_statistics_layers(model)) == ["1", "2", "6", "7"]
    assert list(batch_statistics_layers(model, running=True)) == ["6", "7"]
    assert statistics_of(model[1]).running_statistics() is None
    assert statistics_of(model[3]) is None and statistics_of(model[5]) is None
    with pytest.raises(ValueError, match="no running statistics"):
        statistics_of(model[1]).load_population_statistics(torch.zeros(4), torch.ones(4))


def test_whitening_layers_report_their_matrices() -> None:
    layer = bnn.DecorrelatedBatchNorm2d(4, group_size=2, whitening="iter")
    x = _input()
    batch = statistics_of(layer).batch_statistics(x)
    mean, w = layer.batch_whitening(x)
    assert batch.whitens and batch.var is None
    assert torch.equal(batch.mean, mean) and torch.equal(batch.whitening, w)
    running = statistics_of(layer).running_statistics()
    assert running.whitening is layer.running_whitening and running.mean is layer.running_mean
    # W = 2·I undoes a covariance of ¼ I: σ² + eps = diag((WᵀW)⁻¹)
    layer.running_whitening.copy_(2 * torch.eye(4))
    torch.testing.assert_close(running.variance_plus_eps(), torch.full((4,), 0.25, dtype=F64))
    cov = torch.diag(torch.tensor([4.0, 1.0, 2.0, 9.0], dtype=F64))
    statistics_of(layer).load_population_statistics(torch.ones(4, dtype=F64), cov)
    torch.testing.assert_close(layer.running_whitening,
                               layer.whitening_from_covariance(cov).float())
    assert layer.running_mean.tolist() == [1.0] * 4


class _StdOnlyNorm(nn.Module):
    """A test layer in the manner of EvoNorm B0: x / sqrt(var_B + eps) per channel, no mean
    subtracted, a running variance for eval; it speaks the interface and nothing else."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        var = batch_stats(x)[1] if self.training else self.running_var
        if self.training:
            with torch.no_grad():
                self.running_var.lerp_(var * x[:, 0].numel() / (x[:, 0].numel() - 1), 0.1)
        return x * torch.rsqrt(var + self.eps).view(1, -1, *[1] * (x.dim() - 2))

    def batch_statistics(self, x: Tensor) -> NormStatistics:
        return NormStatistics(None, batch_stats(x)[1], eps=self.eps)

    def running_statistics(self) -> NormStatistics:
        return NormStatistics(None, self.running_var, eps=self.eps)

    def load_population_statistics(self, mean: Tensor, variance: Tensor) -> None:
        self.running_var.copy_(variance)


def test_a_layer_without_a_mean_statistic() -> None:
    """The probe reports only the variance ratio for it, and Precise BN loads its variance."""
    layer = _StdOnlyNorm(2, eps=1.0)
    layer.running_var.copy_(torch.tensor([3.0, 0.0]))
    x = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    var = x.var((0, 2, 3), correction=0)
    got = stats_mismatch(layer, x)
    assert list(got) == ["log_var_ratio"]
    expected = torch.log((var + 1.0) / torch.tensor([4.0, 1.0], dtype=F64)).abs().mean()
    assert float(got["log_var_ratio"]) == pytest.approx(float(expected), rel=1e-5)
    model = nn.Sequential(nn.Identity(), layer)
    assert list(running_stats_layers(model)) == ["1"]
    twin = precise_bn_copy(model, [x.float(), x.float() * 3], 2)
    values = torch.cat([x, x * 3]).movedim(1, -1).reshape(-1, 2)
    torch.testing.assert_close(twin[1].running_var, values.var(0).float())
    assert layer.running_var.tolist() == [3.0, 0.0]  # the original is untouched
    assert math.isclose(float(twin[1].running_var[1]), float(values[:, 1].var()), rel_tol=1e-6)
