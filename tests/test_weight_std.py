"""Weight standardization (Qiao et al. 2019) and Scaled WS (Brock et al. 2021) against float64
oracles written from the papers' formulas: the standardized weight, its gradient (derived by
hand), and the conv layers as convs with that weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from bnlab.nn import ScaledWSConv2d, WSConv2d
from bnlab.nn.weight_std import RELU_GAIN

SHAPES = [(6, 4, 3, 3), (5, 3, 1, 1), (3, 1, 3, 3), (4, 2, 3, 5)]


def oracle_ws(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Qiao et al. Eqs. 5-6, per output channel i, over its I weights: Ŵ = (W − μ)/σ with
    μ = ΣW/I and σ = sqrt(ΣW²/I − μ² + ε), channel by channel, in float64."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        row = w[i].double().flatten()
        n = row.numel()
        mu = row.sum() / n
        sigma = torch.sqrt((row * row).sum() / n - mu * mu + eps)
        out[i] = ((row - mu) / sigma).view(w.shape[1:])
    return out


def oracle_scaled(w: torch.Tensor, gain: torch.Tensor, gamma: float, eps: float
                  ) -> torch.Tensor:
    """Brock et al.: Ŵ = γ·g·(W − μ)/(σ·sqrt(N)), with σ·sqrt(N) = sqrt(N·σ² + ε)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        row = w[i].double().flatten()
        n = row.numel()
        mu = row.sum() / n
        var = (row * row).sum() / n - mu * mu
        out[i] = (gamma * gain[i].double() * (row - mu) / torch.sqrt(n * var + eps)).view(
            w.shape[1:])
    return out


def oracle_ws_grad(w: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dW of Ŵ = (W − μ)/sqrt(σ² + ε) for dL/dŴ = g, per row (the batch-norm backward over
    the fan-in): (g − mean(g) − Ŵ·mean(g·Ŵ)) / sqrt(σ² + ε)."""
    out = torch.empty_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        row, grad = w[i].double().flatten(), g[i].double().flatten()
        n = row.numel()
        mu = row.sum() / n
        s = torch.sqrt((row * row).sum() / n - mu * mu + eps)
        hat = (row - mu) / s
        out[i] = ((grad - grad.mean() - hat * (grad * hat).mean()) / s).view(w.shape[1:])
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 30.0])
def test_ws_weight_and_gradient_equal_the_float64_oracle(shape, scale):
    torch.manual_seed(0)
    conv = WSConv2d(shape[1], shape[0], shape[2:], bias=False).double()
    with torch.no_grad():
        conv.weight.mul_(scale).add_(0.3 * scale)  # a mean to remove and a scale to undo
    w_hat = conv.standardized_weight()
    torch.testing.assert_close(w_hat, oracle_ws(conv.weight.detach(), 1e-5), rtol=1e-12,
                               atol=1e-12)
    g = torch.randn(shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(w_hat, conv.weight, g)
    torch.testing.assert_close(grad, oracle_ws_grad(conv.weight.detach(), g, 1e-5),
                               rtol=1e-10, atol=1e-12 / scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [RELU_GAIN, 1.0])
def test_scaled_ws_weight_and_gradients_equal_the_float64_oracle(shape, gamma):
    torch.manual_seed(1)
    conv = ScaledWSConv2d(shape[1], shape[0], shape[2:], gamma=gamma).double()
    with torch.no_grad():
        conv.gain.uniform_(0.5, 2.0)
        conv.weight.add_(0.1)
    w_hat = conv.standardized_weight()
    expected = oracle_scaled(conv.weight.detach(), conv.gain.detach(), gamma, 1e-4)
    torch.testing.assert_close(w_hat, expected, rtol=1e-12, atol=1e-13)
    g = torch.randn(shape, dtype=torch.float64)
    grad_w, grad_gain = torch.autograd.grad(w_hat, [conv.weight, conv.gain], g)
    # The chain rule through Ŵ = c_i·u_i with c_i = γ·g_i/sqrt(N) and u = the standardized
    # row with ε/N: dL/dW = c_i · WS-backward(g), dL/dg_i = γ/sqrt(N) · Σ_j g_ij u_ij.
    n = math.prod(shape[1:])
    c = (gamma * conv.gain.detach() / math.sqrt(n)).view(-1, 1, 1, 1)
    unit = oracle_ws(conv.weight.detach(), 1e-4 / n)
    torch.testing.assert_close(grad_w, c * oracle_ws_grad(conv.weight.detach(), g, 1e-4 / n),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_gain, gamma / math.sqrt(n) * (g * unit).sum((1, 2, 3)),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [WSConv2d, ScaledWSConv2d])
@pytest.mark.parametrize(("stride", "padding", "bias"), [(1, 1, True), (2, 0, False)])
def test_the_layer_is_a_conv_with_the_standardized_weight(cls, stride, padding, bias):
    torch.manual_seed(2)
    conv = cls(3, 5, 3, stride=stride, padding=padding, bias=bias).double()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    if cls is WSConv2d:
        weight = oracle_ws(conv.weight.detach(), 1e-5)
    else:
        weight = oracle_scaled(conv.weight.detach(), conv.gain.detach(), RELU_GAIN, 1e-4)
    expected = F.conv2d(x, weight, conv.bias, stride=stride, padding=padding)
    out = conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gx_expected,) = torch.autograd.grad(expected, x, g)
    torch.testing.assert_close(gx, gx_expected, rtol=1e-12, atol=1e-12)
    # float32: the same map up to rounding
    conv32, x32 = conv.float(), x.detach().float()
    torch.testing.assert_close(conv32(x32), expected.float(), rtol=1e-5, atol=1e-5)


def test_the_relu_gain_restores_unit_variance():
    # Var(ReLU(z)) for z ~ N(0, 1) is (1 − 1/π)/2: analytically, and by sampling.
    assert RELU_GAIN ** 2 * (1 - 1 / math.pi) / 2 == pytest.approx(1, rel=1e-15)
    z = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert RELU_GAIN ** 2 * torch.relu(z).var().item() == pytest.approx(1, abs=3e-3)


def test_scaled_ws_conv_maps_a_relu_of_unit_variance_to_unit_variance():
    torch.manual_seed(3)
    conv = ScaledWSConv2d(64, 64, 3, padding=1, bias=False)
    x = torch.relu(torch.randn(64, 64, 12, 12))
    out = conv(x)[:, :, 1:-1, 1:-1]  # away from the zero padding
    # per channel variance over samples and positions; mean over channels
    assert out.var((0, 2, 3)).mean().item() == pytest.approx(1, abs=0.05)
    assert out.mean((0, 2, 3)).abs().max().item() < 0.05  # the ReLU's mean is removed


def test_constant_weights_stay_finite_and_gain_is_learnable_and_reset():
    conv = ScaledWSConv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight.fill_(0.7)
        conv.gain.fill_(3.0)
    w_hat = conv.standardized_weight()
    # float32 rounding leaves ~1e-8 of the mean; eps keeps its amplification bounded
    assert torch.isfinite(w_hat).all() and w_hat.abs().max() < 1e-3
    assert torch.isfinite(WSConv2d(2, 3, 3).standardized_weight()).all()
    conv.reset_parameters()
    assert torch.equal(conv.gain, torch.ones(3)) and conv.gain.requires_grad
    assert set(conv.state_dict()) == {"weight", "bias", "gain"}
