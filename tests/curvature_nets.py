"""Tiny float64 nets for the curvature tests and their exact Hessians.

The oracle is ``torch.func.hessian`` over the flattened parameters of a *twin* of the net in
which every norm layer is written from BN's formulas in plain tensor ops (``PlainBatchNorm``):
torch.func differentiates those exactly. (It cannot differentiate bnlab's autograd Functions,
and for torch's own ``nn.BatchNorm`` in train mode it returns a wrong, asymmetric Hessian in
torch 2.14, so neither may serve as the oracle.) Dropout in the twin is the fixed mask that the
curvature code's forward draws under the probes' seed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import bnlab.nn as bnn
from bnlab.probes.readonly import fixed_rng

DTYPE = torch.float64


class PlainBatchNorm(nn.Module):
    """BN from the formulas: the batch's mean and biased variance in train mode, the running
    statistics in eval mode; never updates them."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("running_mean", layer.running_mean.clone())
        self.register_buffer("running_var", layer.running_var.clone())
        self.eps, self.training = layer.eps, layer.training

    def forward(self, x: Tensor) -> Tensor:
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean, var = x.mean(dims), x.var(dims, correction=0)
        else:
            mean, var = self.running_mean, self.running_var
        x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


class FixedDropout(nn.Module):
    def __init__(self, scaled_mask: Tensor) -> None:
        super().__init__()
        self.scaled_mask = scaled_mask

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scaled_mask


def tiny_net(norm: bool, dropout: float = 0.0, seed: int = 0) -> nn.Sequential:
    """conv → BN → ReLU → max-pool → linear → BN → ReLU → (dropout) → linear, 2×4×4 inputs,
    4 classes, ~100 parameters (no BN: identity slots and biases). BN's affine parameters
    and running statistics are moved off their initial values."""
    torch.manual_seed(seed)
    slot2 = (lambda c: bnn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
    slot1 = (lambda c: bnn.BatchNorm1d(c)) if norm else (lambda c: nn.Identity())
    layers = [nn.Conv2d(2, 3, 3, bias=not norm), slot2(3), nn.ReLU(), bnn.MaxPool2d(2),
              nn.Flatten(), nn.Linear(3, 5, bias=not norm), slot1(5), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    net = nn.Sequential(*layers, nn.Linear(5, 4)).to(DTYPE)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, bnn.BatchNorm1d | bnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
        net.train()
        for _ in range(3):
            net(batch(8, seed=seed + 100)[0] * 1.5 + 0.2)
    return net


def batch(n: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=gen, dtype=DTYPE)
    return x, torch.randint(0, 4, (n,), generator=gen)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def oracle_twin(net: nn.Module, bn_train: bool | None = None,
                stats: dict[str, tuple[Tensor, Tensor]] | None = None,
                x: Tensor | None = None) -> nn.Module:
    """``net`` with its BN layers in plain ops (train flag ``bn_train``, default their own;
    running statistics ``stats[name]`` if given), max-pooling by torch's layer, and dropout
    (when ``net`` is in train mode) the mask drawn for input ``x`` under the probe seed."""
    twin = copy.deepcopy(net)
    for name, m in list(twin.named_modules()):
        if isinstance(m, bnn.BatchNorm1d | bnn.BatchNorm2d):
            plain = PlainBatchNorm(m)
            plain.training = m.training if bn_train is None else bn_train
            if stats is not None:
                plain.running_mean, plain.running_var = stats[name]
            _replace(twin, name, plain)
        elif isinstance(m, bnn.MaxPool2d):
            _replace(twin, name, nn.MaxPool2d(m.kernel_size))
        elif isinstance(m, nn.Dropout) and m.training:
            assert x is not None
            shape = twin[: list(twin).index(m)](x).shape  # the dropout's input
            with fixed_rng(x.device):
                mask = F.dropout(torch.ones(shape, dtype=x.dtype), m.p, training=True)
            _replace(twin, name, FixedDropout(mask))
    return twin


def exact(twin: nn.Module, x: Tensor, y: Tensor, names: list[str] | None = None
          ) -> tuple[Tensor, Tensor]:
    """``(H, g)``: the Hessian and gradient of ``cross_entropy(twin(x), y)`` over the parameters
    ``names`` (default all), flattened in that order, by ``torch.func``."""
    base = {n: p.detach() for n, p in twin.named_parameters()}
    names = list(base) if names is None else names
    sizes = [base[n].numel() for n in names]

    def loss(theta: Tensor) -> Tensor:
        parts = dict(zip(names, theta.split(sizes), strict=True))
        params = {**base, **{n: parts[n].view(base[n].shape) for n in names}}
        return F.cross_entropy(functional_call(twin, params, (x,)), y)

    flat = torch.cat([base[n].reshape(-1) for n in names])
    return torch.func.hessian(loss)(flat), torch.func.grad(loss)(flat)


def operator_matrix(op) -> Tensor:
    """The dense matrix of a ``HessianOperator``, column by column."""
    eye = torch.eye(op.dim, dtype=op.dtype)
    return torch.stack([op.matvec(e) for e in eye], 1)
