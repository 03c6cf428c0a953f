"""Every norm of the registry in every model's slots, under compile, and in a user's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.models import build_model, find_slots, norm_factory
from bnlab.registry import option_names

TINY = {"cnn": {"channels": [4, 8], "hidden": 8}, "vgg11": {"hidden": 8},
        "resnet20": {"width": 4, "blocks": 1}, "resnet": {"width": 4, "depth": 8},
        "plain": {"width": 4, "depth": 3}}
LINEAR_SLOTS = ("cnn", "vgg11")  # models with hidden linear slots (1-d layers)
ZOO = ["renorm", "ghost", "group", "layer", "dbn", "iternorm", "frn", "evonorm_b0", "evonorm_s0"]
GROUPS = {"group": {"num_groups": 2}, "dbn": {"group_size": 4}, "iternorm": {"group_size": 4},
          "evonorm_s0": {"groups": 2}}
ONE_CLASS = ("group", "layer", "frn", "evonorm_b0", "evonorm_s0", "sync")  # one layer for (N, C, *)


@pytest.mark.parametrize("model", list(TINY))
@pytest.mark.parametrize("norm", option_names("norm"))
def test_every_norm_fills_every_slot_of_every_model(model, norm):
    torch.manual_seed(0)
    net = build_model(model, norm_factory(norm, **GROUPS.get(norm, {})), **TINY[model])
    slots = find_slots(net)
    kinds = {type(net.get_submodule(s.norm)) for s in slots}
    if norm == "none":
        assert kinds == {nn.Identity}
    else:
        assert nn.Identity not in kinds and len(kinds) >= 1
        if model in LINEAR_SLOTS:  # the hidden linear slots get the 1-d layer
            assert len(kinds) == 2 or norm in ONE_CLASS
    x = torch.randn(6, 3, 32, 32)
    out = net(x)
    out.sum().backward()
    assert out.shape == (6, 10) and torch.isfinite(out).all()
    net.eval()
    assert torch.isfinite(net(x)).all()


@pytest.mark.slow
@pytest.mark.parametrize("norm", ZOO)
def test_compiled_model_matches_eager(norm):
    torch.manual_seed(0)
    eager = build_model("cnn", norm_factory(norm, **GROUPS.get(norm, {})), **TINY["cnn"])
    compiled_model = build_model("cnn", norm_factory(norm, **GROUPS.get(norm, {})),
                                 **TINY["cnn"])
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(8, 3, 32, 32)
    for _ in range(2):  # running statistics move between the steps
        a, b = eager(x), compiled(x)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
    for p, q in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        scale = float(p.grad.abs().max())  # float32 rounding of large gradients
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("norm", ZOO)
def test_replace_batchnorm_puts_any_norm_into_a_users_model(norm):
    user = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 30 * 30, 8), nn.BatchNorm1d(8)).double()
    with torch.no_grad():
        user[1].weight.uniform_(0.5, 1.5)
        user[1].running_mean.uniform_(-1, 1)
    user.eval()
    factory = norm_factory(norm, **GROUPS.get(norm, {}))
    weight, mean = user[1].weight.clone(), user[1].running_mean.clone()
    model = bnn.replace_batchnorm(user, factory)
    assert type(model[1]) is type(factory(8, 2)) and type(model[5]) is type(factory(8, 1))
    assert not model[1].training and model[1].weight.dtype == torch.float64
    assert torch.equal(model[1].weight, weight)
    if hasattr(model[1], "running_mean"):
        assert torch.equal(model[1].running_mean, mean)
    model.train()
    assert torch.isfinite(model(torch.randn(4, 3, 32, 32, dtype=torch.float64))).all()
