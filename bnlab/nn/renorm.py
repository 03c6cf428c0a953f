r"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence
in Batch-Normalized Models", NeurIPS 2017), written from scratch.

In training mode batch norm normalizes with the batch's statistics but evaluates with the
running ones; Batch Renorm corrects the batch-normalized value towards what the running
statistics would give, per channel::

    sigma_B = sqrt(var_B + eps)                 (biased batch variance, as BN)
    sigma   = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max)
    d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

``r`` and ``d`` are computed from the running statistics *before* this step's update and are
constants to the backward (stop-gradient, as in the paper). Unclipped, ``(x - mu_B) / sigma_B
* r + d = (x - running_mean) / sigma``: the inference-time map. The running statistics are
updated exactly as batch norm's; evaluation mode *is* batch norm's.

Since ``r`` and ``d`` are constants, the training step is batch norm with the per-channel
weight ``gamma * r`` and bias ``beta + gamma * d``::

    y = x_hat * (gamma * r) + (beta + gamma * d),   x_hat = (x - mu_B) / sigma_B

so :class:`_BatchRenorm` computes ``r`` and ``d`` and calls :func:`bnlab.nn.batchnorm.batch_norm`
with the folded affine: autograd carries ``d gamma = r sum g x_hat + d sum g`` and
``d beta = sum g`` through the fold, the input gradient is batch norm's (with weight
``gamma * r``), and arguments, errors, dtypes, memory formats and the running-statistics update
are batch norm's by construction. With ``fast`` (the default) eager calls compute the batch
statistics of ``r`` and ``d`` with :func:`bnlab.nn.batchnorm_fast.batch_stats_fast` and run
batch norm's fast path; ``fast=False`` runs the reference code throughout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from bnlab.nn.batchnorm import batch_norm
from bnlab.nn.batchnorm_fast import batch_stats_fast
from bnlab.nn.functional import batch_stats
from bnlab.nn.state import Input1d, Input2d, RunningStatsNorm
from bnlab.nn.stats import ChannelStatistics

__all__ = ["BatchRenorm1d", "BatchRenorm2d"]


def _must_save_all() -> Any:
    """Selective-checkpoint contexts that save every op's output (recompute nothing)."""
    return create_selective_checkpoint_contexts(lambda *_args, **_kw: CheckpointPolicy.MUST_SAVE)


class _BatchRenorm(ChannelStatistics, RunningStatsNorm):
    """Shared base of :class:`BatchRenorm1d` and :class:`BatchRenorm2d`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        r_max: float = 3.0,
        d_max: float = 5.0,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        warmup_steps: int = 0,
        fast: bool = True,
    ) -> None:
        if not r_max >= 1.0:
            raise ValueError(f"r_max must be >= 1, got {r_max}")
        if not d_max >= 0.0:
            raise ValueError(f"d_max must be >= 0, got {d_max}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         fast=fast)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps

    def clip_limits(self) -> tuple[Tensor | float, Tensor | float]:
        """``(r_max_t, d_max_t)`` at step ``t = num_batches_tracked`` (the count after this
        step's increment): the paper's warm-up, ``r_max_t = 1 + (r_max - 1) * min(1, t/T)``
        and ``d_max_t = d_max * min(1, t/T)`` with ``T = warmup_steps``; the plain limits when
        ``T = 0`` or nothing is tracked. Tensors while warming up (no host sync)."""
        if self.warmup_steps == 0 or self.num_batches_tracked is None:
            return self.r_max, self.d_max
        ramp = (self.num_batches_tracked.double() / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * ramp, self.d_max * ramp

    def _corrections(self, x: Tensor, running_mean: Tensor, running_var: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """This step's ``(r, d)``, from the batch and the running statistics before their
        update; computed without autograd (constants to the backward)."""
        if torch.compiler.is_compiling():
            # torch 2.14's AOT partitioner may recompute r and d in the backward from the
            # buffers (cheap ops on graph inputs), after this step has updated them in place:
            # silently wrong gradients (pytorch/pytorch#197039). Must-save keeps their values.
            return checkpoint(self._compute_corrections, x, running_mean, running_var,
                              use_reentrant=False, context_fn=_must_save_all)
        return self._compute_corrections(x, running_mean, running_var)

    def _compute_corrections(self, x: Tensor, running_mean: Tensor, running_var: Tensor
                             ) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if self.fast and not torch.compiler.is_compiling():
                mean, var = batch_stats_fast(x)  # the same statistics in fewer passes
            else:
                mean, var = batch_stats(x)
            sigma = torch.sqrt(running_var.to(var.dtype) + self.eps)
            r_max, d_max = self.clip_limits()
            r = torch.clamp(torch.sqrt(var + self.eps) / sigma, 1.0 / r_max, r_max)
            d = torch.clamp((mean - running_mean.to(mean.dtype)) / sigma, -d_max, d_max)
        return r.to(var.dtype), d.to(var.dtype)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self.momentum_factor()
        running_mean, running_var = self.buffers_for_call()
        weight, bias = self.weight, self.bias
        renormalizes = (
            self.training
            and running_mean is not None
            and running_var is not None
            and (self.r_max > 1.0 or self.d_max > 0.0)  # else r = 1, d = 0: plain BN
            and input.numel() > 0
            and input.shape[1] == running_mean.numel()  # else batch_norm raises BN's error
        )
        if renormalizes:
            r, d = self._corrections(input, running_mean, running_var)
            gamma = 1.0 if weight is None else weight.to(r.dtype)
            beta = 0.0 if bias is None else bias.to(d.dtype)
            # In the buffers' dtype, as batch_norm's dtype rules want the parameters (float32,
            # or the input's dtype); half parameters round the folded ones to half.
            weight = (gamma * r).to(running_mean.dtype)
            bias = (beta + gamma * d).to(running_mean.dtype)
        return batch_norm(input, running_mean, running_var, weight, bias,
                          self.uses_batch_stats(), factor, self.eps, fast=self.fast)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}"
        )


_DOC = r"""Batch Renormalization (Ioffe, NeurIPS 2017) over a {shape} input, written from
    scratch (see :mod:`bnlab.nn.renorm` for the formulas).

    Training mode: :math:`y = \gamma ((x - \mu_B)/\sigma_B \cdot r + d) + \beta` with
    :math:`r = \mathrm{{clip}}(\sigma_B/\sigma, 1/r_{{max}}, r_{{max}})` and
    :math:`d = \mathrm{{clip}}((\mu_B - \mu)/\sigma, -d_{{max}}, d_{{max}})` from the running
    statistics :math:`\mu, \sigma^2` before this step's update, constants to the backward.
    Running statistics are updated as batch norm's; eval mode is batch norm's eval mode. With
    ``r_max=1, d_max=0`` the layer is :class:`{bn}`.

    Same parameters and buffers as :class:`torch.nn.{bn}` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``): state dicts load into each
    other. Without tracked running statistics (``track_running_stats=False``, or buffers not
    updated because the flag was cleared) there is nothing to correct towards, so ``r = 1``
    and ``d = 0``: the layer is batch norm with batch statistics.

    Args:
        num_features: number of channels :math:`C`
        eps: added to the variances. Default: 1e-5
        momentum: running-statistics factor; ``None``: cumulative average. Default: 0.1
        r_max: clip of ``r`` (>= 1). Default: 3.0
        d_max: clip of ``d`` (>= 0). Default: 5.0
        affine: learnable ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics. Default: True
        device, dtype: factory arguments for the parameters and buffers.
        warmup_steps: (keyword-only) the paper's warm-up: ``r_max`` grows linearly from 1 and
            ``d_max`` from 0 to their values over this many training steps (counted by
            ``num_batches_tracked``, see :meth:`clip_limits`); 0: no warm-up. Default: 0
        fast: (keyword-only) eager calls take the fast paths; ``False``: the reference code.
            Default: True

    Shape:
        - Input: {dims}
        - Output: same shape as input
"""


class BatchRenorm1d(Input1d, _BatchRenorm):
    __doc__ = _DOC.format(shape="2D or 3D", bn="BatchNorm1d", dims=r":math:`(N, C)` or "
                          r":math:`(N, C, L)`")


class BatchRenorm2d(Input2d, _BatchRenorm):
    __doc__ = _DOC.format(shape="4D", bn="BatchNorm2d", dims=r":math:`(N, C, H, W)`")
