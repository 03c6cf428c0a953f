r"""EvoNorm B0 and S0 (Liu, Brock, Simonyan & Le, "Evolving Normalization-Activation Layers",
NeurIPS 2020, arXiv 2004.02967), written from scratch.

Both are normalization-activation layers found by search; both divide without subtracting a
mean. For an :math:`(N, C, *)` input, write :math:`L` for the positions of one sample's channel
(:math:`H W` of a conv map; an ``(N, C)`` input is a map of one position), and take every
variance *biased* (divided by the number of values, as BN's batch variance)::

    B0:  y = x / max(sqrt(var_B + eps), v_c * x + sqrt(var_HW + eps)) * gamma_c + beta_c
    S0:  y = x * sigmoid(v_c * x) / sqrt(var_G + eps) * gamma_c + beta_c

* ``var_B``: per channel over the batch and the positions, :math:`(N, *)`, as batch norm's. In
  training it is the batch's (gradients flow through it, as in BN) and the running variance is
  updated as BN's: ``running_var = (1 - momentum) * running_var + momentum * var_B * n/(n-1)``
  (the *unbiased* variance of the :math:`n = N L` values; ``momentum=None``: the cumulative
  average over ``num_batches_tracked`` batches). In evaluation ``running_var`` replaces it.
* ``var_HW``: per sample and channel over the positions (instance variance).
* ``var_G``: per sample over a group of :math:`C / G` consecutive channels and their positions
  (group norm's groups, ``groups`` = G).
* ``v``, ``gamma``, ``beta``: per-channel parameters, initialized to 1, 1, 0.

**1×1 maps.** With one position (a 1×1 conv map, or an ``(N, C)`` input: the hidden linear
slots, which in bnlab's VGGs take the 1×1 map after the fifth pooling) a per-sample variance
runs over one value and is exactly 0, not NaN (a biased variance, never the unbiased one,
whose n − 1 = 0 would divide by zero). B0 becomes
:math:`x / \max(\sqrt{\mathrm{var}_B + \epsilon}, v x + \sqrt{\epsilon})`, finite: its
denominator is never below :math:`\sqrt{\epsilon}` (on any input). S0's group variance runs
over the group's :math:`C / G` channels, and only with one channel per group (``groups = C``)
is it 0, giving :math:`x \sigma(v x) / \sqrt{\epsilon}`: large, but finite. Gradients are
finite too.

In bnlab's models a slot is followed by the model's ReLU (conv → slot → ReLU; in a residual
block, the sum and then the ReLU), where the paper replaces BN + ReLU by the EvoNorm layer
alone.

:func:`evonorm_b0` and :func:`evonorm_s0` are the references: plain differentiable tensor ops
(autograd backward, double backward, ``torch.compile``). Eager calls (B0: in training) take the
fast path of :mod:`bnlab.nn.normfree_fast` (the same values, a hand-derived backward) unless the
layer's ``fast`` is False; ``forward`` shows the choice. In the reference the batch variance
comes from :func:`bnlab.nn.functional.batch_stats`; on both paths the running update is
:func:`bnlab.nn.functional.update_running_stats`. Half inputs are computed in float32 and
returned in their dtype; NCHW and channels_last inputs keep their memory format.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from bnlab.nn import normfree_fast
from bnlab.nn.functional import (
    batch_stats,
    compute_dtype,
    group_means,
    per_channel,
    per_row,
    row_sums,
    update_running_stats,
)
from bnlab.nn.stats import NormStatistics

__all__ = ["EvoNormB0", "EvoNormS0", "evonorm_b0", "evonorm_s0"]


def _instance_variance(x: Tensor) -> Tensor:
    """The biased variance of each (sample, channel) row over its positions, ``(N, C)``;
    two-pass, and exactly 0 for a single position."""
    length = math.prod(x.shape[2:])
    mean = per_row(row_sums(x) / length, x.dim())
    return row_sums((x - mean).square()) / length


def _group_variance(x: Tensor, groups: int) -> Tensor:
    """The biased variance of each sample's group of ``C / groups`` consecutive channels over
    their positions, repeated for each channel of the group: ``(N, C)``; two-pass."""
    size = x.shape[1] // groups * math.prod(x.shape[2:])  # values per group
    mean = per_row(group_means(row_sums(x), groups, size), x.dim())
    return group_means(row_sums((x - mean).square()), groups, size)


def evonorm_b0(input: Tensor, batch_var: Tensor, weight: Tensor, bias: Tensor, v: Tensor,
               eps: float) -> Tensor:
    """EvoNorm B0 of an ``(N, C, *)`` input, given the per-channel ``batch_var`` (``(C,)``: the
    batch's in training, the running one in evaluation); see the module docstring. The
    reference: plain differentiable ops."""
    x = input.to(compute_dtype(input.dtype))
    ndim = x.dim()
    batch_std = per_channel(torch.sqrt(batch_var.to(x.dtype) + eps), ndim)
    instance_std = per_row(torch.sqrt(_instance_variance(x) + eps), ndim)
    v, weight, bias = (per_channel(t.to(x.dtype), ndim) for t in (v, weight, bias))
    y = x / torch.maximum(v * x + instance_std, batch_std) * weight + bias
    return y.to(input.dtype)


def evonorm_s0(input: Tensor, groups: int, weight: Tensor, bias: Tensor, v: Tensor,
               eps: float) -> Tensor:
    """EvoNorm S0 of an ``(N, C, *)`` input with ``groups`` groups of channels (dividing C);
    see the module docstring. The reference: plain differentiable ops."""
    x = input.to(compute_dtype(input.dtype))
    ndim = x.dim()
    group_std = per_row(torch.sqrt(_group_variance(x, groups) + eps), ndim)
    v, weight, bias = (per_channel(t.to(x.dtype), ndim) for t in (v, weight, bias))
    y = x * torch.sigmoid(v * x) / group_std * weight + bias
    return y.to(input.dtype)


class _EvoNorm(nn.Module):
    """The parameters both layers have: ``weight`` (γ), ``bias`` (β) and ``v``, each ``(C,)``."""

    num_features: int
    eps: float

    def __init__(self, num_features: int, eps: float, fast: bool,
                 factory_kwargs: dict[str, Any]) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.fast = fast
        self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
        self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
        self.v = Parameter(torch.empty(num_features, **factory_kwargs))

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, v = 1 (the paper's initialization)."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.ones_(self.v)

    def _check_input(self, input: Tensor) -> None:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"expected an (N, {self.num_features}, *) input, got input of size "
                             f"{tuple(input.shape)}")


class EvoNormB0(_EvoNorm):
    r"""EvoNorm B0 (Liu et al., NeurIPS 2020) over an :math:`(N, C, *)` input:
    :math:`y = x / \max(\sqrt{s^2_B + \epsilon}, v x + \sqrt{s^2_{HW} + \epsilon}) \gamma +
    \beta`, with the batch variance :math:`s^2_B` per channel in training and the running
    variance in evaluation (batch norm's semantics); see :mod:`bnlab.nn.evonorm`.

    Args:
        num_features: number of channels :math:`C`
        eps: added to both variances. Default: 1e-5
        momentum: factor of the running variance's moving average; ``None``: the cumulative
            average. Default: 0.1
        device, dtype: factory arguments for the parameters and buffers.

    Parameters ``weight`` (γ), ``bias`` (β), ``v``; buffers ``running_var`` (ones) and
    ``num_batches_tracked``, named as torch's BN's (no ``running_mean``: B0 subtracts no
    mean). A training batch needs more than one value per channel. It speaks the statistics
    interface (:mod:`bnlab.nn.stats`: a variance and no mean), so the ``bnstats/`` probe
    measures it (``log_var_ratio`` only) and Precise BN re-estimates its running variance.

    Shape:
        - Input: :math:`(N, C, *)`; output: same shape.
    """

    __constants__: ClassVar[list[str]] = ["num_features", "eps", "momentum"]
    momentum: float | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fast: bool = True,
    ) -> None:
        if momentum is not None and (isinstance(momentum, bool)
                                     or not isinstance(momentum, int | float)
                                     or not 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, fast, factory_kwargs)
        self.momentum = None if momentum is None else float(momentum)
        self.running_var: Tensor
        self.num_batches_tracked: Tensor
        self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
        self.register_buffer("num_batches_tracked",
                             torch.zeros((), dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_var`` = 1, ``num_batches_tracked`` = 0."""
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, γ = 1, β = 0, v = 1."""
        self.reset_running_stats()
        super().reset_parameters()

    def _momentum_factor(self) -> float:
        """``momentum``, or ``1/num_batches_tracked`` (cumulative average) for None; advances
        the counter on every training call, before any check of the batch (as torch's BN)."""
        if not self.training:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = self._momentum_factor()
        if not self.training:
            return evonorm_b0(input, self.running_var, self.weight, self.bias, self.v, self.eps)
        n = input.numel() // input.shape[1]
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {tuple(input.shape)}")
        if self.fast and not torch.compiler.is_compiling():
            y, var = normfree_fast.evonorm_b0_train(input, self.weight, self.bias, self.v,
                                                    self.eps, self._reference_train)
        else:
            var = batch_stats(input)[1]
            y = evonorm_b0(input, var, self.weight, self.bias, self.v, self.eps)
        update_running_stats(None, self.running_var, None, var, n, factor)  # no running mean
        return y

    def _reference_train(self, x: Tensor, weight: Tensor, bias: Tensor, v: Tensor) -> Tensor:
        """The training-mode reference, batch variance included (the fast path's oracle)."""
        return evonorm_b0(x, batch_stats(x)[1], weight, bias, v, self.eps)

    # -- the statistics interface (bnlab.nn.stats.BatchStatistics): a variance, no mean --------

    def batch_statistics(self, x: Tensor) -> NormStatistics:
        """The batch variance a training forward divides by (``mean`` None: B0 subtracts none)."""
        return NormStatistics(None, batch_stats(x)[1], eps=self.eps)

    def running_statistics(self) -> NormStatistics:
        """``running_var``, which eval divides by."""
        return NormStatistics(None, self.running_var, eps=self.eps)

    @torch.no_grad()
    def load_population_statistics(self, mean: Tensor, variance: Tensor) -> None:
        """``running_var`` = ``variance``, the (unbiased) population variance; ``mean`` is
        ignored (there is no running mean)."""
        self.running_var.copy_(variance)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class EvoNormS0(_EvoNorm):
    r"""EvoNorm S0 (Liu et al., NeurIPS 2020) over an :math:`(N, C, *)` input:
    :math:`y = x \sigma(v x) / \sqrt{s^2_G + \epsilon} \gamma + \beta`, with the variance
    :math:`s^2_G` of each sample's group of channels (as group norm's); no batch statistics,
    so training and evaluation are the same map; see :mod:`bnlab.nn.evonorm`.

    Args:
        num_features: number of channels :math:`C`
        groups: number of groups :math:`G` of consecutive channels; must divide :math:`C`.
            Default: 32 (the paper's, as group norm's)
        eps: added to the variance. Default: 1e-5
        device, dtype: factory arguments for the parameters.

    Parameters ``weight`` (γ), ``bias`` (β), ``v``; no buffers.

    Shape:
        - Input: :math:`(N, C, *)`; output: same shape.
    """

    __constants__: ClassVar[list[str]] = ["num_features", "groups", "eps"]
    groups: int

    def __init__(
        self,
        num_features: int,
        groups: int = 32,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fast: bool = True,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, fast, factory_kwargs)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
                or num_features % groups:
            raise ValueError(f"groups must be an integer >= 1 dividing num_features "
                             f"({num_features}), got {groups!r}")
        self.groups = groups
        self.reset_parameters()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        if self.fast and not torch.compiler.is_compiling():
            return normfree_fast.evonorm_s0(input, self.groups, self.weight, self.bias, self.v,
                                            self.eps, self._reference)
        return evonorm_s0(input, self.groups, self.weight, self.bias, self.v, self.eps)

    def _reference(self, x: Tensor, weight: Tensor, bias: Tensor, v: Tensor) -> Tensor:
        return evonorm_s0(x, self.groups, weight, bias, v, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, eps={self.eps}"
