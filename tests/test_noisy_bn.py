"""NoisyBatchNorm: the Santurkar et al. (2018) noise model on top of the custom batch norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn.batchnorm import _BatchNorm


def constant_output_layer(**kwargs) -> bnn.NoisyBatchNorm1d:
    """A noisy BN whose clean output is exactly 0 in channel 0 and exactly 1 in channel 1.

    With weight 0 the normalized input is multiplied away and y = bias, so the noisy output
    is s * bias + m: channel 0 shows m alone, channel 1 shows s + m.
    """
    layer = bnn.NoisyBatchNorm1d(2, **kwargs)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([0.0, 1.0]))
    return layer


def test_is_a_custom_batchnorm():
    pairs = [(bnn.NoisyBatchNorm1d, bnn.BatchNorm1d), (bnn.NoisyBatchNorm2d, bnn.BatchNorm2d)]
    for cls, plain in pairs:
        assert issubclass(cls, _BatchNorm) and issubclass(cls, plain)
        assert not issubclass(cls, nn.modules.batchnorm._NormBase)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnn.NoisyBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bnn.NoisyBatchNorm1d(3)(torch.randn(2, 3, 4, 4))


def test_eval_is_the_clean_batch_norm():
    noisy, clean = bnn.NoisyBatchNorm2d(3), bnn.BatchNorm2d(3)
    for _ in range(3):  # same training history -> same running statistics
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        noisy(x)
        clean(x)
    noisy.eval()
    clean.eval()
    x = torch.randn(4, 3, 5, 5)
    state = torch.get_rng_state()
    assert torch.equal(noisy(x), clean(x))
    assert torch.equal(torch.get_rng_state(), state), "eval mode must not consume random numbers"


def test_training_adds_noise_and_keeps_bn_state():
    noisy, clean = bnn.NoisyBatchNorm2d(3), bnn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    y_noisy, y_clean = noisy(x), clean(x)
    assert not torch.allclose(y_noisy, y_clean)
    torch.testing.assert_close(noisy.running_mean, clean.running_mean)
    torch.testing.assert_close(noisy.running_var, clean.running_var)
    assert noisy.num_batches_tracked.item() == 1


def test_exact_formula_against_manual_draws():
    """a' = s * a + m with the documented draws, in the documented order, from the default RNG."""
    layer = bnn.NoisyBatchNorm2d(
        3, mean_range=0.7, std_range=(0.9, 1.4), mean_jitter=0.2, std_jitter=0.3
    )
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 5, 5)
    clean = bnn.BatchNorm2d(3)
    clean.load_state_dict(layer.state_dict())
    a = clean(x)

    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    u = torch.rand(2)
    mu_t = (2 * u[0] - 1) * 0.7
    sigma_t = 0.9 + 0.5 * u[1]
    m = mu_t + 0.2 * (2 * torch.rand(a.shape) - 1)
    s = sigma_t + 0.3 * torch.randn(a.shape)
    torch.testing.assert_close(out, s * a + m)

    # Gradients flow through the noise: d out / d a = s.
    g = torch.randn_like(out)
    torch.manual_seed(123)
    out = layer(x)
    (grad_bias,) = torch.autograd.grad(out, layer.bias, g)
    torch.testing.assert_close(grad_bias, (g * s).sum((0, 2, 3)))


def test_channels_last_input_draws_in_memory_order_and_keeps_the_layout():
    """NHWC noise is drawn as a contiguous (N, H, W, C) block (fast on CPU), viewed as NCHW."""
    layer = bnn.NoisyBatchNorm2d(3, mean_jitter=0.2, std_jitter=0.3)
    x = torch.randn(4, 3, 5, 6).contiguous(memory_format=torch.channels_last)
    clean = bnn.BatchNorm2d(3)
    clean.load_state_dict(layer.state_dict())
    a = clean(x)
    torch.manual_seed(5)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(5)
    u = torch.rand(2)
    mu_t, sigma_t = (2 * u[0] - 1) * 0.5, 1.0 + 0.25 * u[1]
    m = mu_t + 0.2 * (2 * torch.rand(4, 5, 6, 3) - 1)
    s = sigma_t + 0.3 * torch.randn(4, 5, 6, 3)
    torch.testing.assert_close(out, (s * a.permute(0, 2, 3, 1) + m).permute(0, 3, 1, 2))


def test_deterministic_under_seed_and_rng_state():
    layer = bnn.NoisyBatchNorm1d(4)
    x = torch.randn(8, 4)
    torch.manual_seed(7)
    first = layer(x)
    torch.manual_seed(7)
    second = layer(x)
    assert torch.equal(first, second)
    third = layer(x)  # next step: new mu_t, sigma_t
    assert not torch.equal(second, third)
    # Checkpointing the global RNG state (as a training loop does) reproduces the noise.
    state = torch.get_rng_state()
    fourth = layer(x)
    torch.set_rng_state(state)
    assert torch.equal(layer(x), fourth)
    torch.manual_seed(8)
    assert not torch.equal(layer(x), first)


def test_noise_distribution_moments():
    """Fixed seed, many steps: recover mu_t, sigma_t per step and check the distributions."""
    torch.manual_seed(0)
    r_mu, (lo, hi), j_mu, j_s = 0.5, (1.0, 1.25), 0.1, 0.1
    layer = constant_output_layer()
    x = torch.randn(4000, 2)
    steps = 400
    mus, sigmas = [], []
    for _ in range(steps):
        out = layer(x)
        m = out[:, 0]  # channel 0: a = 0, so out = m ~ U(mu_t - j, mu_t + j)
        sm = out[:, 1]  # channel 1: a = 1, so out = s + m
        mu_hat = m.mean()
        # Per activation: m is uniform of half-width j around mu_t ...
        assert (m - mu_hat).abs().max() < j_mu + 0.01
        assert abs(m.var().item() - j_mu**2 / 3) < 0.15 * j_mu**2 / 3
        # ... and s is Gaussian with std j_s: var(s + m) = j_s^2 + j_mu^2 / 3.
        assert abs(sm.var().item() - (j_s**2 + j_mu**2 / 3)) < 0.15 * (j_s**2 + j_mu**2 / 3)
        mus.append(mu_hat.item())
        sigmas.append((sm.mean() - mu_hat).item())
    mus_t, sigmas_t = torch.tensor(mus), torch.tensor(sigmas)
    # Per step: mu_t ~ U(-r, r), sigma_t ~ U(lo, hi) (estimates carry ~0.005 noise).
    assert mus_t.min() > -r_mu - 0.02 and mus_t.max() < r_mu + 0.02
    assert sigmas_t.min() > lo - 0.02 and sigmas_t.max() < hi + 0.02
    # Moments of the per-step draws: 5 standard errors.
    se = math.sqrt(r_mu**2 / 3 / steps)
    assert abs(mus_t.mean().item()) < 5 * se
    assert abs(mus_t.var().item() - r_mu**2 / 3) < 0.2 * r_mu**2 / 3
    width = hi - lo
    assert abs(sigmas_t.mean().item() - (lo + hi) / 2) < 5 * math.sqrt(width**2 / 12 / steps)
    assert abs(sigmas_t.var().item() - width**2 / 12) < 0.25 * width**2 / 12
    # Different steps really draw different mu_t (the noise is time-varying).
    assert mus_t.std() > 0.2


def test_custom_noise_parameters_and_noise_free_setting():
    torch.manual_seed(0)
    layer = constant_output_layer(
        mean_range=2.0, std_range=(3.0, 3.0), mean_jitter=0.0, std_jitter=0.0
    )
    x = torch.randn(16, 2)
    for _ in range(20):
        out = layer(x)
        mu_t = out[0, 0]
        assert torch.all(out[:, 0] == mu_t) and -2.0 <= mu_t.item() <= 2.0
        torch.testing.assert_close(out[:, 1], torch.full((16,), 3.0) + mu_t)
    # All noise off: training output equals the plain BN output.
    quiet = bnn.NoisyBatchNorm2d(
        3, mean_range=0.0, std_range=(1.0, 1.0), mean_jitter=0.0, std_jitter=0.0
    )
    x = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(quiet(x), bnn.BatchNorm2d(3)(x))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mean_range": -0.1},
        {"std_range": (1.5, 1.0)},
        {"mean_jitter": -1.0},
        {"std_jitter": -0.5},
    ],
)
def test_invalid_noise_parameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        bnn.NoisyBatchNorm2d(3, **kwargs)


def test_bn_kwargs_state_dict_and_repr():
    layer = bnn.NoisyBatchNorm2d(5, std_jitter=0.2, eps=1e-3, momentum=None, affine=False)
    assert layer.eps == 1e-3 and layer.momentum is None and layer.weight is None
    assert repr(layer) == (
        "NoisyBatchNorm2d(5, eps=0.001, momentum=None, affine=False, bias=False, "
        "track_running_stats=True, mean_range=0.5, std_range=(1.0, 1.25), mean_jitter=0.1, "
        "std_jitter=0.2)"
    )
    # The state dict is the plain BN's: it loads both ways with torch's layer.
    noisy = bnn.NoisyBatchNorm2d(3)
    noisy(torch.randn(4, 3, 2, 2))
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(noisy.state_dict(), strict=True)
    torch.testing.assert_close(ref.running_mean, noisy.running_mean)
    noisy.load_state_dict(nn.BatchNorm2d(3).state_dict(), strict=True)
    assert noisy.num_batches_tracked.item() == 0


def test_noise_follows_dtype_and_shape():
    cases = [
        ((6, 3), bnn.NoisyBatchNorm1d),
        ((6, 3, 5), bnn.NoisyBatchNorm1d),
        ((2, 3, 4, 4), bnn.NoisyBatchNorm2d),
    ]
    for shape, cls in cases:
        layer = cls(3).double()
        out = layer(torch.randn(shape, dtype=torch.float64))
        assert out.shape == shape and out.dtype == torch.float64
    layer = bnn.NoisyBatchNorm2d(3)
    out = layer(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
