"""Every norm of the zoo has the double backward the curvature code needs (or is refused):
Hessian-vector products against finite differences of the gradient, in float64, on a smooth
variant of the cnn (softplus for ReLU and average pooling, so the differences are exact to
O(ε²); max-pooling is checked against the exact Hessian in test_curvature.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import curvature as cv
from bnlab.errors import UsageError
from bnlab.models import build_model, norm_factory
from bnlab.registry import option_names

EPS = 1e-6


def smooth(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus())
        elif isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(2))
        else:
            smooth(child)
    return module


def tiny_cnn(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = smooth(build_model("cnn", norm_factory(norm), channels=[4, 8], hidden=16)).double()
    with torch.no_grad():  # running statistics off their initial values
        model.train()
        model(torch.randn(8, 3, 32, 32, dtype=torch.float64) * 1.3 + 0.2)
    return model


def shifted(model: nn.Module, direction: dict[str, torch.Tensor], eps: float) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.add_(eps * direction[name])
    return twin


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (8,), generator=gen))


@pytest.mark.parametrize("bn", ["batch", "running"])
@pytest.mark.parametrize("norm", option_names("norm"))
def test_hessian_vector_products_of_every_norm(norm, bn):
    model = tiny_cnn(norm)
    x, y = data()
    if norm == "dbn" and bn == "batch":
        with pytest.raises(UsageError, match=r"ZCA whitening \(features.1\) has no double"):
            cv.hessian_operator(model, F.cross_entropy, x, y, bn=bn)
        return
    op = cv.hessian_operator(model, F.cross_entropy, x, y, bn=bn)
    gen = torch.Generator().manual_seed(2)
    u, v = (torch.randn(op.dim, generator=gen, dtype=torch.float64) for _ in range(2))
    hv = op.matvec(v)
    assert float(u @ hv) == pytest.approx(float(v @ op.matvec(u)), rel=1e-9)  # symmetric
    if norm == "renorm" and bn == "batch":
        return  # r and d are constants to autograd: H is that of the loss with r, d fixed
    grads = [cv.hessian_operator(shifted(model, op.unflatten(v), s * EPS), F.cross_entropy, x,
                                 y, bn=bn).gradient for s in (1, -1)]
    finite = (grads[0] - grads[1]) / (2 * EPS)
    assert float(torch.linalg.vector_norm(finite - hv)) <= 1e-6 * float(
        torch.linalg.vector_norm(hv)), norm


def test_zca_with_running_statistics_and_population_works():
    model = tiny_cnn("dbn").train()
    x, y = data()
    lam_running = cv.top_eigenvalues(model, F.cross_entropy, x, y, bn="running", iters=5)
    lam_population = cv.top_eigenvalues(model, F.cross_entropy, x, y, bn="population",
                                        iters=5, population_batches=[x * 0.9, x + 0.1])
    assert torch.isfinite(lam_running).all() and torch.isfinite(lam_population).all()


@pytest.mark.parametrize(("model", "overrides", "norm"), [
    ("cnn", {"weight_std": "ws"}, "custom"), ("cnn", {"weight_std": "scaled"}, "none"),
    ("resnet", {"residual": "skipinit"}, "custom"), ("resnet", {"residual": "fixup"}, "none"),
    ("resnet", {"residual": "nf", "weight_std": "scaled"}, "none"),
    ("plain", {"depth": 3}, "custom")])
def test_hessian_vector_products_of_the_model_options(model, overrides, norm, monkeypatch):
    """Weight standardization and the residual variants; the ResNet blocks' functional ReLUs
    smoothed too (a difference across a ReLU kink would not be a second derivative)."""
    monkeypatch.setattr(torch, "relu", F.softplus)
    torch.manual_seed(0)
    size = {"depth": 8, "width": 4} if model == "resnet" else {"width": 4} if model == "plain" \
        else {"channels": [4, 8], "hidden": 16}
    net = smooth(build_model(model, norm_factory(norm), **size, **overrides)).double().train()
    x, y = data()
    op = cv.hessian_operator(net, F.cross_entropy, x, y)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hv = op.matvec(v)
    grads = [cv.hessian_operator(shifted(net, op.unflatten(v), s * EPS), F.cross_entropy, x,
                                 y).gradient for s in (1, -1)]
    finite = (grads[0] - grads[1]) / (2 * EPS)
    assert float(torch.linalg.vector_norm(finite - hv)) <= 1e-6 * float(
        torch.linalg.vector_norm(hv))
