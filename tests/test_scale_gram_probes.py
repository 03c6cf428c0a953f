"""The ``scale/`` and ``gram/`` probes: which weights are scale-invariant, the angular update
against its equilibrium on a scale-invariant toy problem run to equilibrium, and the Gram
measures at the watched layers against direct computations. (The read-only contract of both is
in test_probes.py, with every probe.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models import build_model, find_slots, norm_factory
from bnlab.probes.base import Setup
from bnlab.probes.config import ProbeConfig, watched_layers
from bnlab.probes.gram import GramProbe
from bnlab.probes.scale import ScaleProbe, scale_invariant_layers
from bnlab.signal.measures import equilibrium_angle, gram_measures, sample_gram
from tests.test_probes import sgd


def built(probe: type, model: nn.Module, optimizer: torch.optim.Optimizer,
          layers: list[str] | None = None, **keys: object):
    """``probe`` as ``Probes`` builds it, every interval at 1."""
    config = ProbeConfig(**{k: 1 for k in ProbeConfig.model_fields if k.endswith("_every")},
                         **keys)
    slots = find_slots(model)
    watched = layers if layers is not None else watched_layers("all", slots)
    setup = Setup(model, optimizer, F.cross_entropy, torch.zeros(0), slots, watched)
    return probe(config, setup)


def test_scale_invariant_layers_are_those_feeding_a_batch_statistics_norm():
    for norm, expected in [("custom", ["features.0", "features.4", "classifier.0"]),
                           ("torch", ["features.0", "features.4", "classifier.0"]),
                           ("ghost", ["features.0", "features.4", "classifier.0"]),
                           ("none", []), ("layer", []), ("group", [])]:
        model = build_model("cnn", norm_factory(norm), channels=[4, 8], hidden=16)
        assert scale_invariant_layers(model) == expected, norm
    # weight-standardized convs are scale-invariant by themselves; the classifier is not
    for norm in ("none", "custom"):
        ws = build_model("plain", norm_factory(norm), depth=3, width=4, weight_std="scaled")
        assert scale_invariant_layers(ws) == ["features.0", "features.3", "features.6"], norm
    resnet = build_model("resnet20", norm_factory("custom"), width=4, blocks=1)
    assert scale_invariant_layers(resnet) == [
        "conv", "stages.0.conv1", "stages.0.conv2", "stages.1.conv1", "stages.1.conv2",
        "stages.1.shortcut.0", "stages.2.conv1", "stages.2.conv2", "stages.2.shortcut.0"]


def test_a_scale_invariant_weight_gives_the_same_network_at_every_scale():
    """What makes the prediction apply: c·w leaves the loss unchanged and divides its gradient
    by c (so η/‖w‖² is the step's effective learning rate) — up to BN's eps, which the scaled
    variance outweighs more or less."""
    torch.manual_seed(0)
    model = build_model("cnn", norm_factory("custom"), channels=[4, 8], hidden=16).double()
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    weight = model.get_submodule(scale_invariant_layers(model)[1]).weight
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, [weight])
    with torch.no_grad():
        weight.mul_(3.0)
    scaled = F.cross_entropy(model(x), y)
    (scaled_grad,) = torch.autograd.grad(scaled, [weight])
    assert float(scaled.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float((scaled_grad - grad / 3).norm() / (grad / 3).norm()) < 1e-4
    w = weight.detach()
    cosine = float((grad * w).sum() / (grad.norm() * w.norm()))
    assert abs(cosine) < 1e-4  # ∇ ⟂ w


def toy(momentum: float, nesterov: bool = False, steps: int = 400, seed: int = 0):
    """A scale-invariant problem: 16 inputs → linear (no bias) → BN → 4-way softmax, on
    minibatches of 16 from 1024 random points with random labels, so the gradient stays noisy
    and the weight norm settles where weight decay and the gradient balance."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 16, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (1024,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 4, bias=False), norm_factory("custom")(4, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov,
                                weight_decay=0.05)
    probe = built(ScaleProbe, model, optimizer)
    assert probe.layers == ["0"]
    said = []
    for _ in range(steps):
        batch = torch.randint(0, 1024, (16,), generator=gen)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        probe.after_backward(1, None)
        optimizer.step()
        said.append({k: float(v) for k, v in probe.after_step(1).scalars.items()})
    return said


def late_mean(said: list[dict], key: str) -> float:
    late = [s[key] for s in said[len(said) // 2:]]
    return sum(late) / len(late)


def test_the_angular_update_settles_at_its_equilibrium():
    """SGD with momentum α, weight decay λ and learning rate η turns a scale-invariant weight by
    √(2ηλ / (1 + α)) per step at equilibrium (Wan et al. 2021). With α = 0.9, η = 0.1 and
    λ = 0.05 the toy gets there within a few hundred steps: the mean ratio over the second half
    of 400 steps is within 5 % of 1, from well above it at the start."""
    said = toy(0.9, steps=400)
    predicted = equilibrium_angle(0.1, 0.05, 0.9)
    assert said[-1]["scale/angle_pred"] == predicted
    assert late_mean(said, "scale/angle_ratio/0") == pytest.approx(1.0, abs=0.05)
    early = [s["scale/angle_ratio/0"] for s in said[:10]]
    assert sum(early) / len(early) > 1.3  # far from it at the start: the test sees it settle
    s = said[-1]
    assert s["scale/angle/0"] == pytest.approx(s["scale/angle_ratio/0"] * predicted)
    assert s["scale/eff_lr/0"] == pytest.approx(0.1 / s["scale/weight_norm/0"] ** 2)


@pytest.mark.slow
def test_the_equilibrium_without_momentum():
    """α = 0: the prediction is √(2ηλ), √1.9 ≈ 1.38 times the one with α = 0.9, so this checks
    the (1 + α). The weight norm takes longer to settle (it halves on the way), 1600 steps."""
    said = toy(0.0, steps=1600)
    assert said[-1]["scale/angle_pred"] == pytest.approx(math.sqrt(2 * 0.1 * 0.05))
    assert late_mean(said, "scale/angle_ratio/0") == pytest.approx(1.0, abs=0.05)
    assert late_mean(said, "scale/weight_norm/0") < 0.6 * said[0]["scale/weight_norm/0"]


def test_nesterov_and_adam_get_no_prediction():
    said = toy(0.9, nesterov=True, steps=2)
    assert {k.rsplit("/", 1)[0] for k in said[-1]} == {"scale/weight_norm", "scale/angle",
                                                       "scale/eff_lr"}
    model = nn.Sequential(nn.Linear(4, 2, bias=False), norm_factory("custom")(2, 1))
    adam = built(ScaleProbe, model, torch.optim.Adam(model.parameters(), weight_decay=0.1))
    adam.keep_weights()
    assert set(adam.measure_step()) == {"scale/weight_norm/0", "scale/angle/0"}


def test_the_scale_tags_by_hand():
    """One plain SGD step (no momentum) on w = (3, 4) with gradient (0, 0) and weight decay:
    the weight shrinks along itself, angle 0; then a step that turns it by 90°."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False), norm_factory("custom")(1, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    probe = built(ScaleProbe, model, optimizer)
    model[0].weight.grad = torch.zeros(1, 2, dtype=torch.float64)
    probe.keep_weights()
    optimizer.step()  # w ← w − 0.5·0.1·w = 0.95 w
    got = {k: float(v) for k, v in probe.measure_step().items()}
    assert torch.allclose(model[0].weight, torch.tensor([[2.85, 3.8]], dtype=torch.float64))
    assert got == pytest.approx({"scale/weight_norm/0": 5.0, "scale/angle/0": 0.0,
                                 "scale/eff_lr/0": 0.5 / 25,
                                 "scale/angle_ratio/0": 0.0,
                                 "scale/angle_pred": math.sqrt(2 * 0.5 * 0.1)})
    probe.keep_weights()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-4.0, 3.0]]))  # however it got there: 90°
    assert float(probe.measure_step()["scale/angle/0"]) == pytest.approx(math.pi / 2)
    assert probe.measure_step() == {}  # nothing kept: nothing measured


def test_gram_probe_measures_the_watched_layers():
    torch.manual_seed(0)
    model = build_model("cnn", norm_factory("custom"), channels=[4, 8], hidden=16)
    x = torch.randn(12, 3, 32, 32)
    probe = built(GramProbe, model, sgd(model), ["features.0", "features.1", "classifier.1"],
                  gram_samples=5)
    seen = {}
    handles = probe.attach()
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out.detach().clone()))
        for n in probe.modules]
    model(x)
    for h in handles + hooks:
        h.remove()
    got = probe.measure(0).scalars
    assert set(got) == {f"gram/{m}/{n}" for m in ("cos_sim", "stable_rank", "erank")
                        for n in ("features.0", "features.1", "classifier.1")}
    for name, out in seen.items():
        rows = out[:5].reshape(5, -1).double()
        unit = rows / rows.norm(dim=1, keepdim=True)
        gram = unit @ unit.T
        cos = (gram.sum() - 5) / 20
        assert float(got[f"gram/cos_sim/{name}"]) == pytest.approx(float(cos), rel=1e-9)
        eig = torch.linalg.eigvalsh(gram)
        assert float(got[f"gram/stable_rank/{name}"]) == pytest.approx(
            float((eig ** 2).sum() / eig.max() ** 2), rel=1e-9)
        assert got[f"gram/erank/{name}"] == gram_measures(sample_gram(out, 5))["erank"]
    assert probe.measure(0).scalars == {}
