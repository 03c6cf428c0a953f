"""Precise BN: running statistics re-estimated as exact population statistics.

A BN layer's running statistics are an exponential moving average of batch statistics taken
while the weights moved, so they lag behind the current network and carry the noise of the
last few batches; evaluation normalizes with them. Precise BN (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", Sec. 3; fvcore's ``precise_bn``) replaces them, at fixed weights, by the
statistics of the layer inputs over many training batches.

``precise_bn_copy`` does so on a deep copy: it runs the copy in train mode over the batches
(each layer's input then is what it is in training: upstream layers normalize with batch
statistics) and accumulates, per layer with running statistics, the exact population
statistics of its inputs over all values seen (every sample and position of every batch),
in float64, merging per-batch moments (:func:`bnlab.nn.functional.batch_stats`) with Chan et
al.'s parallel formula (no E[x²] − E[x]² cancellation). The layers are found and loaded through
the statistics interface (:mod:`bnlab.nn.stats`), whatever their type:
``load_population_statistics`` gets the population mean and the unbiased population variance
(n − 1 in the denominator, as BN's own running variance; BN and its variants, Batch Renorm and
Ghost BN too: over the whole batches, not per virtual batch; EvoNorm B0 keeps the variance
only), or, for a layer whose statistics are a whitening (decorrelated BN, IterNorm), the
unbiased population covariance, which the layer turns into its running whitening.

Layers without running statistics (``track_running_stats=False``, Group Norm, FRN, EvoNorm S0)
are left alone; every other buffer (``num_batches_tracked``) and every parameter keep the
original's values. The original model, its buffers, ``.grad`` and flags, and the global RNG
streams are untouched: dropout and BN noise in the copy's forwards draw from a forked RNG seeded
with the probes' fixed seed, so a run with Precise BN evaluations trains bit-identically to one
without.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from bnlab.distributed import World, gather_objects
from bnlab.nn.functional import batch_stats, unbiased_variance
from bnlab.nn.stats import batch_statistics_layers, statistics_of
from bnlab.probes.readonly import fixed_rng


class _Moments:
    """Count, mean and scatter (sum of outer products of deviations, or its diagonal) of the
    channels of every input seen, in float64."""

    def __init__(self, full: bool) -> None:
        self.full = full  # the (C, C) scatter matrix, or per-channel sums of squares only
        self.n = 0
        self.mean: Tensor | None = None
        self.scatter: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach()
        n_b = x.numel() // x.shape[1]
        mean_b, var_b = batch_stats(x, dtype=torch.float64)
        if self.full:
            centred = x.movedim(1, -1).reshape(-1, x.shape[1]).double() - mean_b
            scatter_b = centred.T @ centred
        else:
            scatter_b = var_b * n_b
        self.merge(n_b, mean_b, scatter_b)

    def merge(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        """Add the moments of another set of ``n_b`` values."""
        if self.mean is None or self.scatter is None:
            self.n, self.mean, self.scatter = n_b, mean_b, scatter_b
            return
        # Chan, Golub & LeVeque (1979): merge two sets' moments exactly
        n = self.n + n_b
        delta = mean_b - self.mean
        outer = torch.outer(delta, delta) if self.full else delta.square()
        self.scatter = self.scatter + scatter_b + outer * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def covariance(self) -> Tensor:
        """The unbiased variance (or covariance matrix) of all values seen."""
        if self.scatter is None or self.n < 2:
            raise ValueError("Precise BN needs at least two values per channel")
        return unbiased_variance(self.scatter / self.n, self.n)


Pool = Callable[[dict[str, "_Moments"]], None]


@torch.no_grad()
def precise_bn_copy(model: nn.Module, batches: Iterable[Tensor], num_batches: int,
                    pool: Pool | None = None) -> nn.Module:
    """A deep copy of ``model`` whose norm layers' running statistics are the exact population
    statistics of their inputs over the first ``num_batches`` of ``batches`` (input tensors,
    on the model's device, in its memory format); see the module docstring. Runs under
    whatever autocast the caller has. Raises ValueError when ``batches`` yields nothing.
    ``pool`` (a data-parallel run, where ``batches`` are this process's shards) merges each
    layer's moments, in place, with every other process's (:func:`pool_over_ranks`)."""
    inputs = itertools.islice(batches, num_batches)
    first = next(inputs, None)
    if first is None:
        raise ValueError("precise_bn_copy: no batches to estimate the statistics from")
    twin = copy.deepcopy(model)
    layers = batch_statistics_layers(twin, running=True)
    stats = {name: statistics_of(m) for name, m in layers.items()}
    moments = {name: _Moments(full=s.running_statistics().whitens)  # type: ignore[union-attr]
               for name, s in stats.items()}
    buffers = [(b, b.clone()) for m in layers.values() for b in m.buffers(recurse=False)]
    modes = [(m, m.training) for m in twin.modules()]
    handles = [m.register_forward_pre_hook(
        lambda module, args, acc=moments[name]: acc.add(args[0])) for name, m in layers.items()]
    try:
        twin.train()
        # One forked RNG, seeded: the run's streams never move, and the copy's dropout masks
        # do not depend on when in the run it is made.
        with fixed_rng(first.device):
            for x in itertools.chain([first], inputs):
                twin(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    for buffer, value in buffers:  # what the train-mode forwards moved (counters too)
        buffer.copy_(value)
    if pool is not None:
        pool(moments)
    for name, layer_stats in stats.items():
        acc = moments[name]
        if acc.n:  # else the forward never reached it: nothing to estimate from
            assert acc.mean is not None and layer_stats is not None
            layer_stats.load_population_statistics(acc.mean, acc.covariance())
    return twin


def pool_over_ranks(world: World) -> Pool:
    """The ``pool`` of a data-parallel run: every rank's moments, gathered and merged in rank
    order, so that each rank ends with the same statistics of all ranks' values."""

    def pool(moments: dict[str, _Moments]) -> None:
        # (on the CPU while gathered: a CUDA tensor would unpickle onto its sender's device)
        local = {name: (m.n, m.mean.cpu(), m.scatter.cpu()) for name, m in moments.items()
                 if m.mean is not None and m.scatter is not None}
        device = next((m.mean.device for m in moments.values() if m.mean is not None), None)
        for m in moments.values():
            m.n, m.mean, m.scatter = 0, None, None
        for gathered in gather_objects(world, local):
            for name, (n, mean, scatter) in gathered.items():
                moments[name].merge(n, mean.to(device), scatter.to(device))

    return pool
