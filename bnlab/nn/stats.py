r"""The statistics interface of the norm layers: what a layer normalizes with, for code that
measures or re-estimates it without knowing the layer (the ``bnstats/`` probe,
:mod:`bnlab.precise_bn`).

A layer with batch-dependent statistics implements :class:`BatchStatistics`, three methods:

* ``batch_statistics(x)``: the statistics a training forward would normalize ``x`` with, as
  :class:`NormStatistics`, from ``x`` alone, buffers untouched (Ghost BN: the whole batch's,
  not each virtual batch's);
* ``running_statistics()``: the statistics an eval forward normalizes with, or None when the
  layer keeps none (``track_running_stats=False``);
* ``load_population_statistics(mean, variance)``: set the running statistics from population
  statistics of the layer's inputs (Precise BN): the mean ``(C,)`` and the *unbiased* variance
  ``(C,)``, or, for a layer whose statistics are a whitening (:attr:`NormStatistics.whitens`),
  the unbiased ``(C, C)`` covariance.

bnlab's BN and its variants (noisy BN, Batch Renorm, Ghost BN) get it from
:class:`ChannelStatistics` (per-channel mean and variance over BN's state), decorrelated BN and
IterNorm implement it with their whitening matrices, EvoNorm B0 with a variance and no mean (see
below). :func:`statistics_of` gives any module's interface: the module itself, an adapter for
``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` (which we cannot edit; they keep
the same state), or None for a layer without batch statistics (Group/Layer Norm, FRN,
EvoNorm S0, an empty slot).
:func:`batch_statistics_layers` finds them in a model.

Two cases beyond per-channel mean and variance (the second for a layer to come):

* **No mean statistic.** A layer that divides by a batch standard deviation and subtracts no
  mean (EvoNorm B0, :mod:`bnlab.nn.evonorm`) reports ``mean=None`` in its statistics and
  ignores the mean it is given to load; the probe then has no mean shift for it.
* **Statistics pooled across processes.** A layer whose training forward pools its statistics
  over the processes of a group (SyncBN: one all_reduce of counts, sums and sums of squares)
  still computes ``batch_statistics(x)`` from the ``x`` it is given, without communication:
  probes call it on one rank, where a collective would hang, with the whole probe batch. Pooling
  is the caller's: Precise BN reduces its population moments over the ranks before
  ``load_population_statistics``, so every rank loads the same global statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from bnlab.nn.functional import batch_stats

__all__ = [
    "BatchStatistics",
    "ChannelStatistics",
    "NormStatistics",
    "batch_statistics_layers",
    "statistics_of",
]


@dataclass(frozen=True)
class NormStatistics:
    """What a norm layer normalizes with.

    ``mean``: ``(C,)``, or None for a layer that subtracts no mean. ``var``: ``(C,)`` per-channel
    variance (batch statistics: the biased one a training forward divides by; running ones:
    the layer's running variance), None for a whitening layer. ``whitening``: the ``(C, C)``
    matrix ``W`` a whitening layer applies to the centred input, else None. ``eps``: the
    layer's eps (added to ``var``; for a whitening, already inside ``W``).
    """

    mean: Tensor | None
    var: Tensor | None = None
    whitening: Tensor | None = None
    eps: float = 0.0

    @property
    def whitens(self) -> bool:
        """Whether these are a whitening's statistics (a matrix ``W``, not variances)."""
        return self.whitening is not None

    def variance_plus_eps(self) -> Tensor:
        r"""Per channel, :math:`\sigma^2 + \epsilon` in float64: the square of the scale the layer
        divides by. For a whitening ``W``: any whitening of a covariance Σ (ZCA, PCA, Cholesky)
        has :math:`W \Sigma W^\top = I`, so :math:`\operatorname{diag}((W^\top W)^{-1})` is the
        variance (eps included) that ``W`` undoes."""
        if self.whitening is not None:
            w = self.whitening.double()
            return torch.linalg.inv(w.T @ w).diagonal()
        assert self.var is not None
        return self.var.double() + self.eps


@runtime_checkable
class BatchStatistics(Protocol):
    """The interface of a layer with batch-dependent statistics (see the module docstring)."""

    def batch_statistics(self, x: Tensor) -> NormStatistics:
        """What a training forward would normalize ``x`` with; no buffer changes."""
        ...

    def running_statistics(self) -> NormStatistics | None:
        """What an eval forward normalizes with, or None without running statistics."""
        ...

    def load_population_statistics(self, mean: Tensor, variance: Tensor) -> None:
        """Set the running statistics from the population mean and unbiased variance (or
        covariance, for a whitening layer) of the layer's inputs."""
        ...


class ChannelStatistics:
    """:class:`BatchStatistics` for a layer with batch norm's state (``running_mean``,
    ``running_var``, ``eps``): per-channel mean and variance, the batch's from
    :func:`bnlab.nn.functional.batch_stats` (what the reference normalizes with)."""

    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float

    def batch_statistics(self, x: Tensor) -> NormStatistics:
        mean, var = batch_stats(x)
        return NormStatistics(mean, var, eps=self.eps)

    def running_statistics(self) -> NormStatistics | None:
        if self.running_mean is None or self.running_var is None:
            return None
        return NormStatistics(self.running_mean, self.running_var, eps=self.eps)

    @torch.no_grad()
    def load_population_statistics(self, mean: Tensor, variance: Tensor) -> None:
        if self.running_mean is None or self.running_var is None:
            raise ValueError("the layer keeps no running statistics to load into")
        self.running_mean.copy_(mean)
        self.running_var.copy_(variance)


_TORCH_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _TorchBatchNorm(ChannelStatistics):
    """A ``torch.nn`` batch-norm layer through the interface (its state is BN's)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def running_mean(self) -> Tensor | None:  # type: ignore[override]
        return self.module.running_mean

    @property
    def running_var(self) -> Tensor | None:  # type: ignore[override]
        return self.module.running_var

    @property
    def eps(self) -> float:  # type: ignore[override]
        return self.module.eps


def statistics_of(module: nn.Module) -> BatchStatistics | None:
    """``module``'s :class:`BatchStatistics`: the module itself, an adapter for torch's batch
    norms, or None for a layer without batch statistics."""
    if isinstance(module, _TORCH_BATCH_NORMS):
        return _TorchBatchNorm(module)
    if isinstance(module, BatchStatistics):
        return module
    return None


def batch_statistics_layers(model: nn.Module, *, running: bool = False) -> dict[str, nn.Module]:
    """The layers of ``model`` with batch-dependent statistics, by module path, in module
    order; with ``running``, only those that keep running statistics."""
    found = {}
    for name, module in model.named_modules():
        stats = statistics_of(module)
        if stats is not None and (not running or stats.running_statistics() is not None):
            found[name] = module
    return found
