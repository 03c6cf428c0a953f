"""The probes' numbers against direct computations: percentiles, drift, gradient statistics,
gradient-based ICS (brute force) and the loss landscape."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models import find_slots
from bnlab.probes.activations import percentiles
from tests.test_probes import ALL_OFF, batch, make_probes, sgd, tiny_model


def watched(model: nn.Module) -> list[str]:
    return [n for s in find_slots(model) for n in (s.layer, s.norm)]


def capture(model: nn.Module, names: list[str] | None = None) -> tuple[dict, list]:
    """Hooks that keep a copy of each named module's output of the next forwards."""
    names = watched(model) if names is None else names
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names]
    return seen, handles


def values(scalars: dict) -> dict[str, float]:
    return {t: float(v) for t, v in scalars.items()}


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dims), x.std(dims, correction=0)


# -- activation distributions --------------------------------------------------------------


def test_percentiles_mean_std_equal_those_of_the_captured_activation():
    model = tiny_model("torch")
    probes = make_probes(model, sgd(model), **{**ALL_OFF, "act_every": 1, "hist_every": 1,
                                               "hist_samples": 4096})
    seen, handles = capture(model)
    m = probes.start()
    for h in handles:
        h.remove()
    got = values(m.scalars)
    for name, x in seen.items():
        flat = x.flatten()
        for q in (15, 50, 85):
            assert got[f"act/p{q}/{name}"] == pytest.approx(
                float(torch.quantile(flat, q / 100)), rel=1e-5, abs=1e-6)
            assert got[f"act/p{q}/{name}"] == pytest.approx(
                float(np.percentile(flat.numpy(), q)), rel=1e-5, abs=1e-6)
        assert got[f"act/mean/{name}"] == pytest.approx(float(flat.mean()), abs=1e-5)
        assert got[f"act/std/{name}"] == pytest.approx(float(flat.std(correction=0)), rel=1e-5)
        hist = m.histograms[f"act/hist/{name}"]
        assert hist.numel() == min(4096, flat.numel())
        assert torch.isin(hist, flat).all()  # values of this activation, not e.g. after ReLU
    # train mode: the BN output is normalized with the probe batch's own statistics
    mean, std = channel_stats(seen["features.1"])
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-3


def test_percentiles_of_a_tensor_with_nan_are_nan():
    x = torch.arange(100.0)
    assert torch.allclose(percentiles(x), torch.quantile(x, torch.tensor([0.15, 0.5, 0.85])))
    x[7] = math.nan
    assert percentiles(x).isnan().all()


# -- drift ---------------------------------------------------------------------------------


def drift_probes(model: nn.Module, **cfg: object):
    return make_probes(model, sgd(model), **{**ALL_OFF, "act_every": 1, "hist_every": 1,
                                            "hist_samples": 512, **cfg})


def test_drift_is_zero_when_nothing_changed():
    model = tiny_model("torch", dropout=0.5, conv_dropout=0.5)  # same masks at every probe
    probes = drift_probes(model)
    probes.start()
    got = values(probes.after_step(1).scalars)
    for name in watched(model):
        assert got[f"drift/mean_shift/{name}"] == 0
        assert got[f"drift/mean_shift_init/{name}"] == 0
        assert got[f"drift/std_ratio/{name}"] == pytest.approx(1, abs=1e-6)
        assert got[f"drift/std_ratio_init/{name}"] == pytest.approx(1, abs=1e-6)
        assert got[f"drift/w1/{name}"] == 0


@pytest.mark.parametrize("act_seed", ["fixed", "step"])
def test_noisy_bn_drift_at_unchanged_weights_depends_on_the_probe_seed(act_seed):
    """The weights do not move between the probes. Under the fixed seed each probe draws the
    same noise, so nothing drifts; seeded by step each probe draws new noise, as each training
    step does, so the noisy BN outputs drift, and the same step draws the same noise again."""
    def probe_at(step: int) -> dict[str, float]:
        model = tiny_model("noisy")
        probes = drift_probes(model, act_seed=act_seed)
        probes.start()
        return values(probes.after_step(step).scalars)

    got = probe_at(1)
    assert got == probe_at(1)  # reproducible (a resumed run repeats it)
    slots = find_slots(tiny_model("noisy"))
    assert got[f"drift/w1/{slots[0].layer}"] == 0  # upstream of every noisy BN: nothing moved
    for slot in slots:
        w1 = got[f"drift/w1/{slot.norm}"]
        assert w1 == 0 if act_seed == "fixed" else w1 > 0.05


def test_drift_measures_an_injected_shift():
    model = tiny_model("none")  # the conv keeps its bias: shift its output by δ per channel
    probes = drift_probes(model)
    seen, handles = capture(model, ["features.0"])
    start = probes.start()
    for h in handles:
        h.remove()
    mean0, std0 = channel_stats(seen["features.0"])
    delta = 0.5
    with torch.no_grad():
        model.features[0].bias += delta
    first = values(probes.after_step(1).scalars)
    with torch.no_grad():
        model.features[0].bias += delta
    second = values(probes.after_step(2).scalars)
    shift = float((delta / std0).mean())
    w1 = delta / float(seen["features.0"].std(correction=0))
    for name in ("features.0", "features.1"):  # under norm=none the slot output is the input
        assert first[f"drift/mean_shift/{name}"] == pytest.approx(shift, rel=1e-4)
        assert first[f"drift/std_ratio/{name}"] == pytest.approx(1, abs=1e-5)
        assert first[f"drift/w1/{name}"] == pytest.approx(w1, rel=1e-4)
        assert second[f"drift/mean_shift/{name}"] == pytest.approx(shift, rel=1e-4)
        assert second[f"drift/mean_shift_init/{name}"] == pytest.approx(2 * shift, rel=1e-4)
        assert start.histograms[f"act/hist/{name}"].numel() == 512
    assert second["drift/mean_shift/features.4"] > 0.01  # the shift propagates downstream
    assert float(mean0.abs().max()) > 0  # a real activation, not a degenerate one


def test_batch_norm_output_does_not_drift_when_its_input_is_rescaled():
    model = tiny_model("torch")
    probes = drift_probes(model)
    seen, handles = capture(model, ["features.0"])
    start = probes.start()
    for h in handles:
        h.remove()
    mean0, std0 = channel_stats(seen["features.0"])
    with torch.no_grad():
        model.features[0].weight *= 3  # no bias under BN: the conv output is exactly ×3
    got = values(probes.after_step(1).scalars)
    sample = start.histograms["act/hist/features.0"]
    assert got["drift/std_ratio/features.0"] == pytest.approx(3, rel=1e-5)
    assert got["drift/mean_shift/features.0"] == pytest.approx(
        float((2 * mean0.abs() / std0).mean()), rel=1e-4)
    assert got["drift/w1/features.0"] == pytest.approx(
        float(2 * sample.abs().mean() / seen["features.0"].std(correction=0)), rel=1e-4)
    # BN undoes the rescaling for the next layer (up to its eps)
    assert got["drift/std_ratio/features.1"] == pytest.approx(1, abs=1e-3)
    assert got["drift/mean_shift/features.1"] < 1e-3
    assert got["drift/w1/features.1"] < 1e-3


# -- gradients and updates -----------------------------------------------------------------


def test_gradient_norms_nonfinite_fraction_and_update_ratios():
    model = tiny_model("torch")
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **{**ALL_OFF, "grad_every": 2})
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    assert not probes.after_backward(1, x, y).scalars  # not due at step 1
    got = values(probes.after_backward(2, x, y).scalars)
    for n, p in params.items():
        assert got[f"grad/norm/{n}"] == pytest.approx(float(p.grad.norm()), rel=1e-5)
    assert got["grad/global_norm"] == pytest.approx(
        math.sqrt(sum(float(p.grad.norm()) ** 2 for p in params.values())), rel=1e-5)
    assert got["grad/nonfinite"] == 0
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.step()
    got = values(probes.after_step(2).scalars)
    for n, p in params.items():
        assert got[f"opt/weight_norm/{n}"] == pytest.approx(float(p.detach().norm()), rel=1e-5)
        ratio = float((p.detach() - before[n]).norm() / before[n].norm())
        assert got[f"opt/update_ratio/{n}"] == pytest.approx(ratio, rel=1e-4)
    with torch.no_grad():
        params["features.0.weight"].grad.view(-1)[:3] = math.nan
        params["classifier.3.bias"].grad[0] = -math.inf
    got = values(probes.after_backward(4, x, y).scalars)
    total = sum(p.numel() for p in params.values())
    assert got["grad/nonfinite"] == pytest.approx(4 / total)
    assert math.isnan(got["grad/norm/features.0.weight"])
    assert got["grad/norm/classifier.3.bias"] == math.inf


# -- gradient-based ICS --------------------------------------------------------------------


def brute_force_ics(model: nn.Module, optimizer: torch.optim.SGD, x: torch.Tensor,
                    y: torch.Tensor, layer: str) -> tuple[float, float]:
    """‖G − G′‖ and cos(G, G′) with the earlier layers hand-updated by SGD's formula."""
    group = optimizer.param_groups[0]
    lr, mu, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], \
        group["nesterov"]
    names = [n for n, _ in model.named_parameters()]
    weight = f"{layer}.weight"
    shifted = copy.deepcopy(model)
    real = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in list(shifted.named_parameters())[:names.index(weight)]:
            d = real[n].grad + wd * real[n]
            buf = mu * optimizer.state[real[n]]["momentum_buffer"] + d
            p -= lr * (d + mu * buf if nesterov else buf)
    loss = F.cross_entropy(shifted(x), y)
    (g_shifted,) = torch.autograd.grad(loss, [shifted.get_submodule(layer).weight])
    g = real[weight].grad
    cos = (g * g_shifted).sum() / (g.norm() * g_shifted.norm())
    return float((g - g_shifted).norm()), float(cos)


@pytest.mark.parametrize("nesterov", [False, True])
def test_gradient_ics_equals_a_brute_force_computation(nesterov):
    model = tiny_model("torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=nesterov,
                                weight_decay=1e-2)
    probes = make_probes(model, optimizer, **{**ALL_OFF, "ics_every": 3})
    for step in (1, 2, 3):  # two real steps first, so the momentum buffers are not zero
        x, y = batch(seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        got = values(probes.after_backward(step, x, y).scalars)
        if step < 3:
            assert not got
            optimizer.step()
    slots = find_slots(model)
    assert got[f"ics/l2/{slots[0].layer}"] == 0  # nothing comes before the first layer
    assert got[f"ics/cos/{slots[0].layer}"] == pytest.approx(1)
    for slot in slots[1:]:
        l2, cos = brute_force_ics(model, optimizer, x, y, slot.layer)
        assert l2 > 1e-3  # a real shift, so the comparison means something
        assert got[f"ics/l2/{slot.layer}"] == pytest.approx(l2, rel=1e-4)
        assert got[f"ics/cos/{slot.layer}"] == pytest.approx(cos, rel=1e-5)


def test_ics_sees_only_the_weight_update_not_dropout_noise():
    """With lr 0 nothing moves, so G′ = G exactly: every probe forward of one step draws the
    same dropout masks (and BN noise), whatever the run's RNG state."""
    model = tiny_model("torch", dropout=0.5, conv_dropout=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    probes = make_probes(model, optimizer, **{**ALL_OFF, "ics_every": 1})
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    got = values(probes.after_backward(1, x, y).scalars)
    assert [v for t, v in got.items() if t.startswith("ics/l2/")] == [0, 0, 0]


# -- loss landscape ------------------------------------------------------------------------


def test_loss_landscape_equals_a_direct_computation():
    model = tiny_model("torch")
    optimizer = sgd(model, lr=0.05)
    probes = make_probes(model, optimizer, **{**ALL_OFF, "landscape_every": 1,
                                              "landscape_points": 4,
                                              "landscape_range": [0.5, 4.0]})
    optimizer.param_groups[0]["lr"] = 0.001  # a schedule's decay: η stays in base-lr units
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    got = values(probes.after_backward(1, x, y).scalars)
    g = [p.grad for p in model.parameters()]
    g_norm = math.sqrt(sum(float(t.norm()) ** 2 for t in g))
    losses, diffs, betas = [], [], []
    for eta in np.linspace(0.5 * 0.05, 4.0 * 0.05, 4):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, gp in zip(moved.parameters(), g, strict=True):
                p -= eta * gp
        loss = F.cross_entropy(moved(x), y)
        g_moved = torch.autograd.grad(loss, list(moved.parameters()))
        diff = math.sqrt(sum(float((a - b).norm()) ** 2 for a, b in zip(g, g_moved,
                                                                         strict=True)))
        losses.append(float(loss.detach()))
        diffs.append(diff)
        betas.append(diff / (eta * g_norm))
    assert got["landscape/loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert got["landscape/grad_pred"] == pytest.approx(max(diffs) - min(diffs), rel=1e-4)
    assert got["landscape/beta"] == pytest.approx(max(betas), rel=1e-4)
    assert got["landscape/loss_range"] > 0
