r"""The pieces every from-scratch norm layer is built from, as plain differentiable tensor ops.

For an input of shape :math:`(N, C, *)` the statistics of a channel run over every dimension
except 1 (:func:`reduce_dims`); :math:`n` is the number of values a statistic averages.

* :func:`batch_stats`: the per-channel mean and *biased* variance (two-pass, never
  :math:`E[x^2] - E[x]^2`; ``var_mean`` under ``torch.compile``, the same statistics in one
  compiled reduction), in the compute dtype (float32 for half inputs) or a given one.
  The one definition of per-channel statistics: the layers' references, the probes
  (``bnlab.probes``) and Precise BN compute them here; the eager fast paths' fused passes
  (``batchnorm_fast.py``) are tested against it.
* :func:`unbiased_variance`: the correction :math:`\sigma^2 \cdot n / (n - 1)` from the biased
  variance of :math:`n` values to the unbiased one (running statistics, Precise BN).
* :func:`normalize`: :math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}`, then the
  per-channel affine :math:`\gamma \hat x + \beta` (:func:`affine`).
* :func:`row_sums` and :func:`per_row`: sums over each (sample, channel) row's positions, and
  the ``(N, C)`` result viewed to broadcast back; :func:`group_means` pools them over groups
  of channels (the per-sample statistics of FRN, EvoNorm).
* :func:`update_running_stats`: the moving average of the mean and of the unbiased variance, in
  place, outside autograd.

Autograd differentiates all of these, so a layer written from them gets its backward, double
backward and ``torch.compile`` support for free; batch norm's hand-derived backward and its fast
CPU path are checked against them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "affine",
    "batch_stats",
    "compute_dtype",
    "group_means",
    "normalize",
    "per_channel",
    "per_row",
    "reduce_dims",
    "row_sums",
    "unbiased_variance",
    "update_running_stats",
]

# Half inputs are computed in float32 ("opmath") and cast back, as torch's CPU kernels do.
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics and the arithmetic use for inputs of ``dtype``."""
    return torch.float32 if dtype in _REDUCED_FLOATS else dtype


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Every dimension except the channel dimension 1: ``(0, 2, 3, ...)``."""
    return (0, *range(2, x.dim()))


def per_channel(t: Tensor, ndim: int) -> Tensor:
    """View a ``(C,)`` vector so it broadcasts against an ``(N, C, *)`` tensor of ``ndim`` dims."""
    return t.view((1, -1) + (1,) * (ndim - 2))


def row_sums(x: Tensor) -> Tensor:
    """``(N, C, *)`` summed over the positions ``*`` of each sample and channel: ``(N, C)`` (an
    ``(N, C)`` input is its own sum: one position)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:])).sum(-1)


def group_means(sums: Tensor, groups: int, size: int) -> Tensor:
    """``(N, C)`` per-row sums -> the mean of each row's group (``groups`` groups of consecutive
    channels within a sample, ``size`` values each), repeated for each channel: ``(N, C)``."""
    n, c = sums.shape
    return (sums.view(n, groups, c // groups).sum(-1) / size).repeat_interleave(c // groups, 1)


def per_row(t: Tensor, ndim: int) -> Tensor:
    """View an ``(N, C)`` tensor (a value per sample and channel) so it broadcasts against an
    ``(N, C, *)`` tensor of ``ndim`` dims."""
    return t.view(t.shape + (1,) * (ndim - 2))


def batch_stats(
    x: Tensor, dims: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` over ``dims`` (default
    :func:`reduce_dims`), as ``(C,)`` vectors computed in ``dtype`` (default: the compute
    dtype). Two-pass: the mean first, then the mean of squared deviations, which does not
    cancel when ``|mean| >> std``."""
    dims = reduce_dims(x) if dims is None else dims
    xf = x.to(compute_dtype(x.dtype) if dtype is None else dtype)
    if torch.compiler.is_compiling():
        # The same statistics in the form Inductor compiles to one (Welford) reduction that
        # reads x once; the two-pass form below compiles to two. Eager var_mean is a slow
        # kernel on the CPU, so eager code keeps the two passes.
        var, mean = torch.var_mean(xf, dims, correction=0)
        return mean, var
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).square().mean(dims)
    return mean.flatten(), var


def normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    r""":math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}` per channel, in the compute
    dtype; ``mean`` and ``var`` are ``(C,)`` vectors."""
    ndim = x.dim()
    xf = x.to(compute_dtype(x.dtype))
    return (xf - per_channel(mean, ndim)) * per_channel(torch.rsqrt(var + eps), ndim)


def affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    r""":math:`\gamma \hat x + \beta` per channel (either may be None: no scale, no shift)."""
    ndim = x_hat.dim()
    if weight is not None:
        x_hat = x_hat * per_channel(weight.to(x_hat.dtype), ndim)
    if bias is not None:
        x_hat = x_hat + per_channel(bias.to(x_hat.dtype), ndim)
    return x_hat


def unbiased_variance(var: Tensor, n: int) -> Tensor:
    r"""The unbiased variance :math:`\sigma^2 \cdot n / (n - 1)` from the biased ``var`` of
    ``n > 1`` values (also elementwise for a covariance matrix)."""
    return var * (n / (n - 1))


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor | None,
    var: Tensor,
    n: int,
    momentum: float,
) -> None:
    r"""``running = (1 - momentum) * running + momentum * batch``, in place, for the mean and
    for the :func:`unbiased_variance` (``var`` is the biased one of ``n`` values, ``n > 1``).
    Computed in the statistic's dtype and rounded once into the buffer's dtype. A None buffer
    is left alone (and ``mean`` may be None without a running mean)."""
    if running_mean is not None and mean is not None:
        running_mean.copy_(running_mean.to(mean.dtype) * (1.0 - momentum) + mean * momentum)
    if running_var is not None:
        unbiased = unbiased_variance(var, n)
        running_var.copy_(running_var.to(var.dtype) * (1.0 - momentum) + unbiased * momentum)
