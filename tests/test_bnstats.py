"""The statistics-mismatch probe (``bnstats/``): against hand-computed values for BN layers (and
Batch Renorm, Ghost BN) with set running statistics and for decorrelated BN; which layers it
measures; read-only."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab.nn as bnn
from bnlab.probes.base import Setup
from bnlab.probes.bnstats import StatsMismatchProbe, running_stats_layers, stats_mismatch
from bnlab.probes.config import ProbeConfig
from bnlab.probes.forward import probe_forward
from bnlab.probes.readonly import PROBE_SEED
from tests.test_probes import ALL_OFF, make_probes, sgd, tiny_model


def stats_probe(model: nn.Module, x: Tensor) -> StatsMismatchProbe:
    """The probe alone, with the default config, on a model that may have no norm slots."""
    return StatsMismatchProbe(ProbeConfig(), Setup(model, torch.optim.SGD(model.parameters()),
                                                   F.cross_entropy, x, [], []))


def with_moments(means: list[float], variances: list[float], n: int = 4) -> Tensor:
    """An (n, C, 2, 2) input whose channel c has mean means[c] and biased variance
    variances[c] exactly, channels uncorrelated: half the values of channel c are m + s, half
    m − s, the signs flipping every 2^c values (Walsh functions: orthogonal, mean 0)."""
    index = torch.arange(4 * n)
    channels = [m + math.sqrt(v) * (1 - 2 * (index // 2**c % 2)).double()
                for c, (m, v) in enumerate(zip(means, variances, strict=True))]
    x = torch.stack(channels, 1).reshape(n, 2, 2, -1).permute(0, 3, 1, 2)
    return x.float().contiguous()


def bn_with_running_stats(make: Callable[..., nn.Module]) -> nn.Module:
    layer = make(2, eps=1.0)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, -1.0]))
        layer.running_var.copy_(torch.tensor([3.0, 0.0]))
    return layer


@pytest.mark.parametrize("make", [nn.BatchNorm2d, bnn.BatchNorm2d, bnn.BatchRenorm2d,
                                  functools.partial(bnn.GhostBatchNorm2d, virtual_batch_size=2)],
                         ids=["torch", "custom", "renorm", "ghost"])
def test_bn_mismatch_equals_the_hand_computed_values(make):
    """Channel 0: batch mean 1, variance 4; running 0, 3; eps 1 → shift |1 − 0|/√4 = ½,
    |log(5/4)|. Channel 1: batch −2, 1; running −1, 0 → shift 1/√1 = 1, |log(2/1)|."""
    layer = bn_with_running_stats(make)
    x = with_moments([1.0, -2.0], [4.0, 1.0])
    got = {k: float(v) for k, v in stats_mismatch(layer, x).items()}
    assert got == {"mean_shift": pytest.approx(0.75),
                   "log_var_ratio": pytest.approx((math.log(1.25) + math.log(2)) / 2)}
    # the same numbers from the probe: taken before the train-mode forward moves the buffers
    model = nn.Sequential(nn.Identity(), layer)
    probe = stats_probe(model, x)
    probe_forward(model, x, PROBE_SEED, [probe])
    got = {k: float(v) for k, v in probe.measure(0).scalars.items()}
    assert got == {"bnstats/mean_shift/1": pytest.approx(0.75),
                   "bnstats/log_var_ratio/1": pytest.approx((math.log(1.25) + math.log(2)) / 2)}
    assert layer.running_mean.tolist() == [0.0, -1.0]  # read-only
    assert layer.num_batches_tracked == 0


def test_evonorm_b0_mismatch_is_the_variance_ratio_alone():
    """EvoNorm B0 divides by a batch std and subtracts no mean: the channels of the test above
    give only |log(5/4)| and |log(2/1)|, from the probe too, read-only."""
    layer = bnn.EvoNormB0(2, eps=1.0)
    layer.running_var.copy_(torch.tensor([3.0, 0.0]))
    x = with_moments([1.0, -2.0], [4.0, 1.0])
    expected = pytest.approx((math.log(1.25) + math.log(2)) / 2)
    assert {k: float(v) for k, v in stats_mismatch(layer, x).items()} == {
        "log_var_ratio": expected}
    model = nn.Sequential(nn.Identity(), layer)
    assert list(running_stats_layers(model)) == ["1"]
    probe = stats_probe(model, x)
    probe_forward(model, x, PROBE_SEED, [probe])
    assert {k: float(v) for k, v in probe.measure(0).scalars.items()} == {
        "bnstats/log_var_ratio/1": expected}
    assert layer.running_var.tolist() == [3.0, 0.0] and layer.num_batches_tracked == 0


def test_ghost_bn_is_measured_with_the_whole_batch_statistics():
    """Virtual batches of 2 samples whose means differ (±3): per chunk the variance is 1, over
    the whole batch 10, and the latter is what the tags use."""
    ghost = bn_with_running_stats(functools.partial(bnn.GhostBatchNorm2d, virtual_batch_size=2))
    x = with_moments([0.0, 0.0], [1.0, 1.0])
    x[:2] += 3
    x[2:] -= 3
    expected = stats_mismatch(bn_with_running_stats(nn.BatchNorm2d), x)
    got = stats_mismatch(ghost, x)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert torch.equal(value, expected[key]), key
    # channel 0: |log((10 + 1) / (3 + 1))|; per chunk it would be |log((1 + 1) / 4)|
    assert float(got["log_var_ratio"]) == pytest.approx(
        (math.log(11 / 4) + math.log(11 / 1)) / 2)


def test_no_mismatch_when_the_running_stats_are_the_batch_stats():
    layer = nn.BatchNorm2d(2, momentum=None)
    x = with_moments([0.5, 3.0], [2.0, 0.25], n=8)
    layer.running_mean.copy_(torch.tensor([0.5, 3.0]))
    layer.running_var.copy_(torch.tensor([2.0, 0.25]))
    got = stats_mismatch(layer, x)
    # zero up to the float32 rounding of the input
    assert float(got["mean_shift"]) == pytest.approx(0, abs=1e-7)
    assert float(got["log_var_ratio"]) == pytest.approx(0, abs=1e-7)


def test_decorrelated_mismatch_equals_the_hand_computed_values():
    """W_run = 2·I: running variance + eps = diag((WᵀW)⁻¹) = ¼, std ½. Batch mean (1, 0)
    against running (0, 0) → shift mean(1/½, 0) = 1. Batch covariance diag(4, 1), eps 1 →
    W_B = diag(1/√5, 1/√2); ‖W_B − W_run‖_F / ‖W_run‖_F = √((1/√5 − 2)² + (1/√2 − 2)²) / √8."""
    layer = bnn.DecorrelatedBatchNorm2d(2, eps=1.0)
    layer.running_whitening.copy_(2 * torch.eye(2))
    x = with_moments([1.0, 0.0], [4.0, 1.0])
    got = {k: float(v) for k, v in stats_mismatch(layer, x).items()}
    dist = math.sqrt((1 / math.sqrt(5) - 2) ** 2 + (1 / math.sqrt(2) - 2) ** 2) / math.sqrt(8)
    assert got == {"mean_shift": pytest.approx(1.0), "whitening_dist": pytest.approx(dist)}


def test_only_layers_with_running_statistics_are_measured():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          bnn.GroupNorm(2, 4), nn.Identity(), bnn.BatchNorm2d(4),
                          bnn.DecorrelatedBatchNorm2d(4))
    assert list(running_stats_layers(model)) == ["1", "7", "8"]
    x = torch.randn(4, 3, 5, 5)
    probe = stats_probe(model, x)
    probe_forward(model, x, PROBE_SEED, [probe])
    assert sorted(probe.measure(0).scalars) == [
        "bnstats/log_var_ratio/1", "bnstats/log_var_ratio/7", "bnstats/mean_shift/1",
        "bnstats/mean_shift/7", "bnstats/mean_shift/8", "bnstats/whitening_dist/8"]


@pytest.mark.parametrize("norm", ["torch", "renorm", "ghost", "dbn", "evonorm_b0"])
def test_probe_in_a_model_measures_each_norm_input_at_init(norm):
    """At init the running statistics are mean 0, variance 1 (whitening I): the tags follow
    from the inputs the norm layers saw in the probe forward."""
    model = tiny_model(norm, dropout=0.5, conv_dropout=0.3)
    probes = make_probes(model, sgd(model), **{**ALL_OFF, "bnstats_every": 1})
    norms = list(running_stats_layers(model))
    seen: dict[str, Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in norms]
    got = {t: float(v) for t, v in probes.start().scalars.items()}
    for h in handles:
        h.remove()
    second = "whitening_dist" if norm == "dbn" else "log_var_ratio"
    means = () if norm == "evonorm_b0" else ("mean_shift",)  # B0 subtracts no mean
    assert len(norms) == 3  # the cnn's two conv slots and its hidden linear slot
    assert set(got) == {f"bnstats/{m}/{n}" for m in (*means, second) for n in norms}
    for name, x in seen.items():
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        layer = model.get_submodule(name)
        run_var_eps = 1.0 if norm == "dbn" else 1 + layer.eps  # diag((I·I)⁻¹) for the whitening
        if means:
            assert got[f"bnstats/mean_shift/{name}"] == pytest.approx(
                float((mean.abs() / math.sqrt(run_var_eps)).mean()), rel=1e-5)
        if norm == "dbn":
            _, w_batch = layer.batch_whitening(x)
            eye = torch.eye(len(w_batch), dtype=torch.float64)
            assert got[f"bnstats/whitening_dist/{name}"] == pytest.approx(
                float((w_batch.double() - eye).norm() / eye.norm()))
        else:
            assert got[f"bnstats/log_var_ratio/{name}"] == pytest.approx(
                float(torch.log((var + layer.eps) / (1 + layer.eps)).abs().mean()))


def test_decorrelated_layer_stays_read_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.DecorrelatedBatchNorm2d(4, group_size=2),
                          nn.ReLU(), nn.Dropout())
    x = torch.randn(4, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    probe = stats_probe(model, x)
    probe_forward(model, x, PROBE_SEED, [probe])
    assert probe.measure(0).scalars
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)
