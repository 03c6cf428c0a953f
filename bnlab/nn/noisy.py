r"""Batch norm followed by the time-varying noise of Santurkar et al. (2018).

"How Does Batch Normalization Help Optimization?" (NeurIPS 2018), Sec. 2.1, tests whether BN
helps by reducing internal covariate shift: it deliberately *injects* distributional
instability after every BN layer and shows that training is barely affected. Per layer and
per training step:

.. math::

    \mu_t \sim U(-r_\mu, r_\mu), \qquad \sigma_t \sim U(\sigma_\text{low}, \sigma_\text{high})

and then, independently for every activation :math:`a` (every element of the output, i.e.
per sample, channel and position):

.. math::

    m \sim U(\mu_t - j_\mu, \mu_t + j_\mu), \qquad s \sim \mathcal{N}(\sigma_t, j_\sigma^2),
    \qquad a \leftarrow s \cdot a + m

Defaults: :math:`r_\mu = 0.5`, :math:`(\sigma_\text{low}, \sigma_\text{high}) = (1, 1.25)`,
:math:`j_\mu = 0.1`, :math:`j_\sigma = 0.1` (``std_jitter`` is the standard deviation of
:math:`s`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d"]


class _NoisyBatchNorm(_BatchNorm):
    """Custom batch norm + Santurkar et al. noise in training mode.

    The noise is applied only in training mode: it models the distributional instability of
    the layer's output *during training* (the internal covariate shift the experiment
    amplifies); the network that is evaluated is the clean one, so eval mode is exactly the
    plain batch norm with running statistics.

    Random numbers are drawn from torch's default generator of the output's device (no private
    generator), so ``torch.manual_seed`` and a training loop that checkpoints the global RNG
    state make the noise reproducible. Gradients flow through the noise as through any
    elementwise affine map (:math:`\\partial a'/\\partial a = s`); the noise itself is constant.

    The noise settings are plain attributes, not state: the state dict is exactly that of
    the underlying batch norm, so it loads into and from torch's and our layers.
    """

    def __init__(
        self,
        num_features: int,
        mean_range: float = 0.5,
        std_range: tuple[float, float] = (1.0, 1.25),
        mean_jitter: float = 0.1,
        std_jitter: float = 0.1,
        **bn_kwargs: Any,
    ) -> None:
        std_low, std_high = (float(v) for v in std_range)
        if mean_range < 0:
            raise ValueError(f"mean_range must be >= 0, got {mean_range}")
        if std_low > std_high:
            raise ValueError(f"std_range must be (low, high) with low <= high, got {std_range}")
        if mean_jitter < 0:
            raise ValueError(f"mean_jitter must be >= 0, got {mean_jitter}")
        if std_jitter < 0:
            raise ValueError(f"std_jitter must be >= 0, got {std_jitter}")
        super().__init__(num_features, **bn_kwargs)
        self.mean_range = float(mean_range)
        self.std_range = (std_low, std_high)
        self.mean_jitter = float(mean_jitter)
        self.std_jitter = float(std_jitter)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mean_range={self.mean_range}, std_range={self.std_range}, "
            f"mean_jitter={self.mean_jitter}, std_jitter={self.std_jitter}"
        )

    def add_noise(self, a: Tensor) -> Tensor:
        """Return :math:`s \\cdot a + m` with fresh per-step and per-activation noise."""
        std_low, std_high = self.std_range
        # Per step: one uniform pair -> (mu_t, sigma_t). Drawn on a's device and dtype from
        # the default generator.
        u = torch.rand(2, device=a.device, dtype=a.dtype)
        mu_t = (2.0 * u[0] - 1.0) * self.mean_range
        sigma_t = std_low + (std_high - std_low) * u[1]
        # Per activation: m ~ U(mu_t - j, mu_t + j), s ~ N(sigma_t, std_jitter^2).
        m = mu_t + self.mean_jitter * (2.0 * _draw_like(torch.rand, a) - 1.0)
        s = sigma_t + self.std_jitter * _draw_like(torch.randn, a)
        return torch.addcmul(m, s, a)

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input)
        if self.training:
            out = self.add_noise(out)
        return out


def _draw_like(draw: Callable[..., Tensor], a: Tensor) -> Tensor:
    """``draw`` (``torch.rand`` or ``torch.randn``) shaped and laid out like ``a``, filled in
    ``a``'s memory order: torch's CPU ``randn_like`` of a channels_last tensor is much slower
    than a draw into contiguous memory (docs/benchmarks.md). For contiguous ``a`` this is
    ``draw(a.shape)``."""
    order = sorted(range(a.dim()), key=lambda d: -a.stride(d))  # outermost dim first (stable)
    noise = draw([a.shape[d] for d in order], device=a.device, dtype=a.dtype)
    return noise.permute([order.index(d) for d in range(a.dim())])


class NoisyBatchNorm1d(_NoisyBatchNorm, BatchNorm1d):
    r""":class:`bnlab.nn.BatchNorm1d` followed by Santurkar et al. noise in training mode.

    See :mod:`bnlab.nn.noisy` for the noise model.

    Args:
        num_features: number of channels :math:`C`.
        mean_range: :math:`r_\mu`, per-step mean shift :math:`\mu_t \sim U(-r_\mu, r_\mu)`.
            Default: 0.5
        std_range: :math:`(\sigma_\text{low}, \sigma_\text{high})`, per-step scale
            :math:`\sigma_t \sim U(\sigma_\text{low}, \sigma_\text{high})`. Default: (1, 1.25)
        mean_jitter: :math:`j_\mu`, per-activation shift :math:`m \sim U(\mu_t \pm j_\mu)`.
            Default: 0.1
        std_jitter: :math:`j_\sigma`, std of the per-activation scale
            :math:`s \sim \mathcal{N}(\sigma_t, j_\sigma^2)`. Default: 0.1
        **bn_kwargs: passed to :class:`bnlab.nn.BatchNorm1d` (``eps``, ``momentum``,
            ``affine``, ``track_running_stats``, ``device``, ``dtype``, ``bias``, ``fast``).

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; output: same shape.
    """


class NoisyBatchNorm2d(_NoisyBatchNorm, BatchNorm2d):
    r""":class:`bnlab.nn.BatchNorm2d` followed by Santurkar et al. noise in training mode.

    See :mod:`bnlab.nn.noisy` for the noise model and :class:`NoisyBatchNorm1d` for the
    arguments.

    Shape:
        - Input: :math:`(N, C, H, W)`; output: same shape.
    """
