"""Precise BN: the copy's running statistics are the exact population statistics of the inputs
its norm layers saw; the original model, its training and the RNG stay untouched."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook

import bnlab.nn as bnn
from bnlab.precise_bn import precise_bn_copy
from bnlab.probes.bnstats import running_stats_layers
from tests.test_probes import batch, sgd, tiny_model


def batches(count: int, seed: int = 0) -> list[Tensor]:
    return [batch(8, seed=seed + i)[0] for i in range(count)]


def population(model: nn.Module, inputs: Iterable[Tensor], num_batches: int
               ) -> tuple[nn.Module, dict[str, list[Tensor]], list[bool]]:
    """``precise_bn_copy`` with a global hook that keeps, by module path in the copy, every
    input each layer with running statistics saw, and whether it ran in train mode."""
    seen: dict[int, list[Tensor]] = {}
    modes: list[bool] = []

    def keep(module: nn.Module, args: tuple) -> None:
        seen.setdefault(id(module), []).append(args[0].detach().clone())
        modes.append(module.training)

    handle = register_module_forward_pre_hook(keep)
    try:
        twin = precise_bn_copy(model, inputs, num_batches)
    finally:
        handle.remove()
    by_name = {name: seen.get(id(m), []) for name, m in running_stats_layers(twin).items()}
    return twin, by_name, modes


def flat(xs: list[Tensor]) -> Tensor:
    """All values seen by channel: (values, C), float64."""
    return torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1]) for x in xs]).double()


@pytest.mark.parametrize("norm", ["torch", "custom", "noisy", "renorm", "ghost", "evonorm_b0"])
def test_running_stats_are_the_population_statistics_of_the_layer_inputs(norm):
    model = tiny_model(norm, dropout=0.5, conv_dropout=0.3)
    twin, seen, modes = population(model, batches(5), num_batches=5)
    assert all(modes)  # train mode: each layer saw inputs normalized with batch statistics
    assert len(running_stats_layers(twin)) == 3  # two conv slots and the hidden linear one
    for name, layer in running_stats_layers(twin).items():
        assert len(seen[name]) == 5, name
        values = flat(seen[name])
        mean, var = values.mean(0), values.var(0, correction=1)
        if norm == "evonorm_b0":  # a running variance and no running mean
            assert not hasattr(layer, "running_mean")
        else:
            torch.testing.assert_close(layer.running_mean, mean.float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-6, atol=1e-7)
        original = model.get_submodule(name)
        assert not torch.allclose(layer.running_var, original.running_var)  # really re-estimated
        assert torch.equal(layer.num_batches_tracked, original.num_batches_tracked)
    assert all(a.training == b.training for a, b in zip(model.modules(), twin.modules(),
                                                          strict=True))


def test_only_the_first_num_batches_are_used():
    model = tiny_model("custom")
    drawn: list[int] = []

    def endless() -> Iterator[Tensor]:
        for i in itertools.count():
            drawn.append(i)
            yield batch(8, seed=i)[0]

    _, seen, _ = population(model, endless(), num_batches=3)
    assert {len(xs) for xs in seen.values()} == {3}
    assert drawn == [0, 1, 2]  # nothing drawn beyond what is used
    with pytest.raises(ValueError, match="no batches"):
        precise_bn_copy(model, [], 4)


def test_decorrelated_layer_gets_the_whitening_of_the_population_covariance():
    """Groups of 2 of 4 channels: running_whitening is block-diagonal, each block W_g the ZCA
    whitening of the group's population covariance: W_g (Σ_g + eps·I) W_g = I, W_g symmetric."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnn.DecorrelatedBatchNorm2d(4, group_size=2),
                          nn.ReLU())
    twin, seen, _ = population(model, batches(3), num_batches=3)
    values = flat(seen["1"])
    cov = torch.cov(values.T, correction=1)
    layer = twin[1]
    torch.testing.assert_close(layer.running_mean, values.mean(0).float())
    w = layer.running_whitening.double()
    assert torch.equal(w[:2, 2:], torch.zeros(2, 2, dtype=torch.float64))
    for g in (slice(0, 2), slice(2, 4)):
        sigma = cov[g, g] + layer.eps * torch.eye(2, dtype=torch.float64)
        torch.testing.assert_close(w[g, g] @ sigma @ w[g, g], torch.eye(2, dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(w[g, g], w[g, g].T)
    assert not torch.allclose(layer.running_whitening, model[1].running_whitening)


def test_layers_without_running_statistics_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.Conv2d(4, 4, 3), bnn.BatchNorm2d(4), nn.GroupNorm(2, 4))
    twin, seen, _ = population(model, batches(2), num_batches=2)
    assert list(seen) == ["4"]
    assert twin[1].running_mean is None and twin[1].running_var is None
    values = flat(seen["4"])
    torch.testing.assert_close(twin[4].running_var, values.var(0).float())


def test_the_original_model_and_its_training_are_untouched():
    """Two short training runs, one making a Precise BN copy (and evaluating it) between its
    steps: weights, buffers, gradients, optimizer state, flags and RNG end bit-identical."""
    runs = []
    for precise in (False, True):
        model = tiny_model("noisy", dropout=0.5, conv_dropout=0.3)
        optimizer = sgd(model)
        torch.manual_seed(123)
        for step in range(3):
            x, y = batch(8, seed=step)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if precise and step == 1:
                before = {k: v.clone() for k, v in model.state_dict().items()}
                twin = precise_bn_copy(model, batches(2, seed=50), 2)
                twin.eval()
                twin(x)
                assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
                assert all(m.training for m in model.modules())
        runs.append((model, optimizer, torch.get_rng_state()))
    (m0, o0, rng0), (m1, o1, rng1) = runs
    assert torch.equal(rng0, rng1)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    for key in sd0:
        assert torch.equal(sd0[key], sd1[key]), key
    for p0, p1 in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad)
    for s0, s1 in zip(o0.state.values(), o1.state.values(), strict=True):
        assert torch.equal(s0["momentum_buffer"], s1["momentum_buffer"])
