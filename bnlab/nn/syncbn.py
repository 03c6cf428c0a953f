r"""Synchronized batch normalization (torch.distributed), written from scratch.

Under data-parallel training every process holds a share (a *shard*) of the batch. A plain BN
layer normalizes each shard with its own statistics; :class:`SyncBatchNorm` normalizes every
shard with the statistics of the whole batch, so each process computes exactly what one
BatchNorm computes on the concatenated batch. It is built from the reference BN's pieces
(:mod:`bnlab.nn.functional`, and the hand-derived backward of :mod:`bnlab.nn.batchnorm` with
its sums pooled), and works on CPU (gloo) as on GPU (NCCL); torch's ``nn.SyncBatchNorm``
refuses CPU tensors.

Training mode, for process ``r`` with ``n_r`` values per channel (``n_r = 0`` is allowed: an
empty shard still joins the collectives)::

    local (two-pass, as BN):  m_r = 1/n_r sum x,   M_r = sum (x - m_r)^2
    one all_reduce (SUM) of   [n_r m_r,  M_r + n_r m_r^2,  n_r]   (float64, 2C + 1 numbers)
                       gives  [sum x,    sum x^2,          n  ]   over the whole batch
    mu  = (sum x) / n,  var = (sum x^2) / n - mu^2     (biased; clamped at 0)
    y   = gamma * (x - mu) / sqrt(var + eps) + beta

    backward: one all_reduce (SUM) of [sum g, sum g * x_hat] (2C numbers), then BN's
    d x = gamma / sqrt(var + eps) * (g - 1/n sum g - x_hat * 1/n sum g * x_hat)
    with the global sums and n; d gamma = sum g * x_hat and d beta = sum g over this shard
    only (DistributedDataParallel sums them over processes, as for any parameter).

Running statistics move towards ``mu`` and the unbiased ``var * n / (n - 1)`` of the whole
batch: the same numbers on every process, since every process reduces the same all_reduce
result with the same ops.

Why one all_reduce of sums (and not of means). Counts differ between shards, so the shards'
means cannot simply be averaged; sums and counts add up, whatever the shard sizes. The sum of
squares invites the cancellation of ``E[x^2] - E[x]^2`` when ``|mu| >> std``; two things keep
it away. Each process forms its sum of squares from its own two-pass moments, so only the
spread *between* shard means is left to cancel, and the merge runs in float64. Its relative
error in ``var``, about ``2^-53 (mu/std)^2``, is below the error float32 BN already makes in
its output, about ``2^-24 |mu|/std`` (the rounding of the mean), for any ``|mu|/std`` below
~5e8: for float32 and half inputs the merge costs no accuracy. For float64 inputs it loses
``log10(|mu|/std)`` digits against single-process BN (at ``|mu|/std = 1e4``: about 1e-8 in
``var`` where BN is good to 1e-12).
The exact alternatives cost more communication: a second all_reduce (the global mean first,
then ``sum (x - mu)^2``) doubles the latency of every layer, and gathering every shard's
``(n_r, m_r, M_r)`` and merging them with Chan et al.'s formula (what torch's SyncBatchNorm
does, with an all_gather) sends ``world_size`` times as much.

The global count is read on the host once per layer and step, so that a whole batch of one
value per channel raises BN's ``ValueError`` on every process (none is left waiting in a
collective) and an all-empty batch gives BN's empty output. On CUDA that read is a device
sync, as in torch's SyncBatchNorm (its mask of empty shards). Under ``torch.compile`` the
synchronized forward runs eagerly (the rest of the model is compiled around it).

Without communication, the layer is BatchNorm (:func:`bnlab.nn.batchnorm.batch_norm`): in
eval mode (running statistics; with ``track_running_stats=False`` each process's own batch
statistics, as in torch), outside an initialized process group, in a group of one process, and
inside :func:`local_statistics`, for forwards that only one process runs (a rank-0 probe: an
all_reduce there would wait forever for the others).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from bnlab.nn.batchnorm import _as_output, _backward, batch_norm
from bnlab.nn.compat import (
    check_eps,
    check_params,
    empty_batch_output,
    requested_grads,
    save_param_dtypes,
)
from bnlab.nn.functional import (
    affine,
    batch_stats,
    compute_dtype,
    normalize,
    update_running_stats,
)
from bnlab.nn.state import RunningStatsNorm
from bnlab.nn.stats import ChannelStatistics

__all__ = ["SyncBatchNorm", "global_batch_stats", "local_statistics", "sync_batch_norm",
           "sync_group"]

_local_depth = 0  # > 0 inside local_statistics()


@contextlib.contextmanager
def local_statistics() -> Iterator[None]:
    """Inside the block every :class:`SyncBatchNorm` is BatchNorm on this process's batch: no
    collective. For forward (and backward) passes that one process runs alone, such as the
    probes of rank 0; the others would never join an all_reduce."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def sync_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group a training-mode forward synchronizes over: ``process_group`` (default: the
    whole world) if a process group is initialized and has more than one process, and we are
    not inside :func:`local_statistics`; else None (plain BatchNorm)."""
    if _local_depth or not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


@torch.no_grad()
def global_batch_stats(x: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and *biased* variance of the batch whose shards the processes of
    ``group`` hold (``x`` is this one's), in the compute dtype, and its number of values per
    channel; one all_reduce (see the module docstring). Every process gets the same numbers.
    Constants to autograd: the backward of :class:`_SyncBatchNormFn` accounts for them."""
    channels, n_local = x.shape[1], x.numel() // x.shape[1]
    if n_local:
        mean, var = batch_stats(x)
        mean, var = mean.double(), var.double()
        sums = torch.cat([mean * n_local, (var + mean.square()) * n_local])
    else:  # an empty shard adds nothing, but its process must take part in the collective
        sums = torch.zeros(2 * channels, dtype=torch.float64, device=x.device)
    packed = torch.cat([sums, sums.new_full((1,), n_local)])
    dist.all_reduce(packed, group=group)
    count = int(packed[-1].item())
    cdtype = compute_dtype(x.dtype)
    if count == 0:
        nan = torch.full((channels,), float("nan"), dtype=cdtype, device=x.device)
        return nan, nan, 0
    mean = packed[:channels] / count
    var = (packed[channels:-1] / count - mean.square()).clamp_(min=0)
    return mean.to(cdtype), var.to(cdtype), count


class _SyncBatchNormFn(Function):
    """Normalization with the whole batch's statistics ``mean``, ``var`` (of ``count`` values
    per channel): ``forward(x, weight, bias, mean, var, eps, count, group) -> y``. Its backward
    is BN's with the sums pooled by one all_reduce, differentiable once (the statistics are
    not recomputed for a double backward, which would need more collectives)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        var: Tensor,
        eps: float,
        count: int,
        group: dist.ProcessGroup,
    ) -> Tensor:
        y = affine(normalize(x, mean, var, eps), weight, bias)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.count, ctx.group = eps, count, group
        save_param_dtypes(ctx, weight, bias)
        return _as_output(y, x)

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors

        def pool(sum_g: Tensor, sum_g_x_hat: Tensor) -> tuple[Tensor, Tensor, int]:
            both = torch.cat([sum_g, sum_g_x_hat])
            dist.all_reduce(both, group=ctx.group)
            return both[: len(sum_g)], both[len(sum_g):], ctx.count

        # Without an input grad the pooled sums are not needed: no collective (every process
        # has the same graph, so all of them skip it).
        grads = _backward(grad_y, x, weight, mean, var, ctx.eps, with_batch_stats=True,
                          pool=pool if ctx.needs_input_grad[0] else None)
        return (*requested_grads(ctx, *grads), None, None, None, None, None)


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group: dist.ProcessGroup,
) -> Tensor:
    """Training-mode batch norm with the statistics of the batch that the processes of
    ``group`` hold together (``input`` is this process's shard); the running statistics, if
    given, are updated in place with them."""
    check_eps(eps, training=True)
    check_params(input, running_mean, running_var, weight, bias, training=True)
    mean, var, count = global_batch_stats(input, group)
    if count == 0:
        return empty_batch_output(input, weight, bias)
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {input.size()} on this process and 1 value per channel over "
                         f"all {dist.get_world_size(group)} processes")
    y = _SyncBatchNormFn.apply(input, weight, bias, mean, var, eps, count, group)
    update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


@functools.cache
def _eager_sync_batch_norm() -> Callable[..., Tensor]:
    """``sync_batch_norm`` as torch.compile runs it: eagerly, for its collectives and the host
    read of the count (which would break the graph anyway, with a warning per layer). Wrapped
    when the first layer is built, not at import: ``torch.compiler.disable`` imports
    ``torch._dynamo``, seconds that every bnlab process (a bad-input check too) would pay."""
    return torch.compiler.disable(sync_batch_norm)


class SyncBatchNorm(ChannelStatistics, RunningStatsNorm):
    r"""Batch Normalization over an :math:`(N, C, *)` input with the statistics of the whole
    batch that the processes of ``process_group`` hold together, written from scratch (see
    :mod:`bnlab.nn.syncbn` for the formulas and the choices made).

    In training mode each process's output and input gradient are those of one BatchNorm on
    the concatenation of all processes' batches (which may differ in size, and be empty on
    some); the ``weight`` and ``bias`` gradients are this process's share of that BatchNorm's
    (``DistributedDataParallel`` sums them). The running statistics, updated with the whole
    batch's mean and unbiased variance, are the same on every process. Eval mode, a process
    outside an initialized process group (or alone in it) and :func:`local_statistics` use no
    communication: there the layer is :class:`bnlab.nn.BatchNorm2d` and its siblings.

    Parameters, buffers and state-dict keys are torch's BatchNorm's (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``): checkpoints load either way.
    Its statistics interface (:mod:`bnlab.nn.stats`) is batch norm's, and its
    ``batch_statistics(x)`` those of ``x`` alone, without communication (a probe calls it on
    one rank); pooling them is the caller's (Precise BN pools its moments over the ranks).

    Args:
        num_features: number of channels :math:`C`
        eps: added to the variance. Default: 1e-5
        momentum: running-statistics factor; ``None``: cumulative average. Default: 0.1
        affine: learnable ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics (else eval mode uses each process's own
            batch statistics). Default: True
        process_group: the processes whose batches are pooled; None: the whole world.
        device, dtype: factory arguments for the parameters and buffers.
        bias: (keyword-only) if ``False``, no additive bias. Default: True
        fast: (keyword-only) where the layer is BatchNorm, eager calls take BN's fast path
            (the synchronized forward is the reference code). Default: True

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape as input
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        fast: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device,
                         dtype, bias=bias, fast=fast)
        self.process_group = process_group
        self._sync_batch_norm = _eager_sync_batch_norm()

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self.momentum_factor()
        running_mean, running_var = self.buffers_for_call()
        group = sync_group(self.process_group) if self.training else None
        if group is None:
            return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                              self.uses_batch_stats(), factor, self.eps, fast=self.fast)
        return self._sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     factor, self.eps, group)
