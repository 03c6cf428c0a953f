r"""Batch normalization written from scratch: the reference implementation.

This is the file to read, and to change, to study batch norm. Everything here is plain
differentiable tensor ops, built on the pieces of :mod:`bnlab.nn.functional`; no native
normalization kernel (``F.batch_norm``, ``torch.native_batch_norm``, ...) is ever called.

* :func:`batch_norm`: the functional form, with the semantics of
  :func:`torch.nn.functional.batch_norm`;
* :class:`_BatchNormTrainFn` (batch statistics) and :class:`_BatchNormEvalFn` (running
  statistics): autograd Functions whose backward is the hand-derived one, :func:`_backward`;
* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: the modules, drop-in
  replacements for torch's (their state lives in :class:`bnlab.nn.state.RunningStatsNorm`).

Elsewhere: torch's argument checks, dtype rules and memory formats are in
:mod:`bnlab.nn.compat`; :mod:`bnlab.nn.batchnorm_fast` is a faster eager CPU implementation of
the same formulas, tested against this file. Which one runs is chosen in :func:`batch_norm`:
the fast path for eager calls with ``fast=True`` (the modules' ``fast`` option, on by
default), this file otherwise. ``torch.compile`` always traces this file. The modules report
their statistics through :mod:`bnlab.nn.stats` (Precise BN and the ``bnstats/`` probe use it).

Notation (for an input of shape :math:`(N, C, *)`): :math:`n = N \cdot \prod *` is the number
of values that share one channel, sums :math:`\sum` run over every dimension except 1, and
:math:`g = \partial L / \partial y` is the gradient flowing into the layer.

Training mode (batch statistics)::

    mu      = 1/n sum x                          per-channel mean
    var     = 1/n sum (x - mu)^2                 per-channel *biased* variance
    x_hat   = (x - mu) / sqrt(var + eps)
    y       = gamma * x_hat + beta

    d beta  = sum g
    d gamma = sum g * x_hat
    d x     = gamma / sqrt(var + eps) * (g - 1/n sum g - x_hat * 1/n sum g * x_hat)

The last two terms of ``d x`` come from mu and var depending on x. Evaluation mode uses the
running statistics instead; they are constants, so ``d x = gamma / sqrt(running_var + eps) * g``
and ``d gamma``, ``d beta`` are as above. In training mode the running statistics (when
tracked) move towards the batch's, with the *unbiased* variance::

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

Half (float16/bfloat16) inputs are computed in float32 and the output cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from bnlab.nn.batchnorm_fast import FastEvalFn, FastTrainFn
from bnlab.nn.compat import (
    check_eps,
    check_params,
    empty_batch_output,
    output_memory_format,
    requested_grads,
    save_param_dtypes,
    suggest_memory_format,
    verify_batch_size,
)
from bnlab.nn.functional import (
    affine,
    batch_stats,
    compute_dtype,
    normalize,
    per_channel,
    reduce_dims,
    update_running_stats,
)
from bnlab.nn.state import RunningStatsNorm
from bnlab.nn.stats import ChannelStatistics

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm"]


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------

Pool = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, int]]  # see _backward


def _backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    with_batch_stats: bool,
    pool: Pool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The hand-derived ``(d x, d gamma, d beta)`` of :math:`y = \gamma \hat x + \beta` (see
    the module docstring); ``with_batch_stats``: ``mean`` and ``var`` are the batch's, so they
    depend on ``x`` too. ``d x`` has grad_y's dtype and the memory format torch gives it; the
    parameter grads are in the compute dtype. ``pool`` (:mod:`bnlab.nn.syncbn`: ``x`` is one
    process's share of the batch) maps this share's ``(sum g, sum g x_hat)`` to the whole
    batch's and its ``n``, for ``d x``; ``d gamma``, ``d beta`` stay this share's."""
    ndim, n = x.dim(), x.numel() // x.shape[1]
    dims = reduce_dims(x)
    x_hat = normalize(x, mean, var, eps)
    g = grad_y.to(x_hat.dtype)
    d_bias = g.sum(dims)
    d_weight = (g * x_hat).sum(dims)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight.to(scale.dtype) * scale
    if with_batch_stats:
        # mu and var depend on x: their terms take out g's mean and its projection on x_hat.
        sum_g, sum_g_x_hat = d_bias, d_weight
        if pool is not None:
            sum_g, sum_g_x_hat, n = pool(sum_g, sum_g_x_hat)
        g = g - per_channel(sum_g / n, ndim) - x_hat * per_channel(sum_g_x_hat / n, ndim)
    dx = g * per_channel(scale, ndim)
    return dx.to(grad_y.dtype).contiguous(memory_format=suggest_memory_format(x)), d_weight, d_bias


def _as_output(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in the input's dtype and in the memory format torch gives the output."""
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


class _BatchNormTrainFn(Function):
    """Batch norm with batch statistics: ``forward(x, weight, bias, eps) -> (y, mean, var)``.

    ``mean`` and the biased ``var`` are returned (non-differentiable, in the compute dtype) so
    that :func:`batch_norm` updates the running statistics outside the Function. Only ``x`` and
    per-channel vectors are saved for the backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = batch_stats(x)
        y = affine(normalize(x, mean, var, eps), weight, bias)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        save_param_dtypes(ctx, weight, bias)
        ctx.mark_non_differentiable(mean, var)
        return _as_output(y, x), mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: autograd differentiates this backward, and there the saved
            # statistics would be constants; recomputed from x, the second derivative is exact.
            mean, var = batch_stats(x)
        grads = _backward(grad_y, x, weight, mean, var, ctx.eps, with_batch_stats=True)
        return (*requested_grads(ctx, *grads), None)


class _BatchNormEvalFn(Function):
    """Batch norm with given (running) statistics, constants to autograd as in torch:
    ``forward(x, weight, bias, running_mean, running_var, eps) -> y``, a per-channel affine map
    of ``x``. Its backward is made of differentiable ops, so double backward works too."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
    ) -> Tensor:
        # (x - running_mean) is formed before scaling, so values near a huge mean stay exact.
        cdtype = compute_dtype(x.dtype)
        mean, var = running_mean.to(cdtype), running_var.to(cdtype)
        y = affine(normalize(x, mean, var, eps), weight, bias)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        save_param_dtypes(ctx, weight, bias)
        return _as_output(y, x)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, mean, var = ctx.saved_tensors
        grads = _backward(grad_y, x, weight, mean, var, ctx.eps, with_batch_stats=False)
        return (*requested_grads(ctx, *grads), None, None, None)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    fast: bool = True,
) -> Tensor:
    r"""Functional batch norm with the semantics of :func:`torch.nn.functional.batch_norm`.

    If ``training`` is true, batch statistics normalize the input and, if given,
    ``running_mean``/``running_var`` are updated in place with factor ``momentum``
    (the variance stored is the unbiased one, :math:`\sigma^2 \cdot n/(n-1)`). Otherwise the
    given running statistics normalize the input. ``fast``: eager calls take the fast path of
    :mod:`bnlab.nn.batchnorm_fast` (the same formulas in fewer passes over memory); ``False``
    runs this file's Functions, which ``torch.compile`` always traces.
    """
    if training:
        verify_batch_size(input.size())
    check_eps(eps, training)
    if input.numel() == 0:
        return empty_batch_output(input, weight, bias)
    check_params(input, running_mean, running_var, weight, bias, training)

    if fast and not torch.compiler.is_compiling():
        train_fn, eval_fn = FastTrainFn, FastEvalFn
    else:
        train_fn, eval_fn = _BatchNormTrainFn, _BatchNormEvalFn
    if not training:
        return eval_fn.apply(input, weight, bias, running_mean, running_var, eps)
    y, mean, var = train_fn.apply(input, weight, bias, eps)
    n = input.numel() // input.shape[1]  # > 1, checked by verify_batch_size
    update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return y


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class _BatchNorm(ChannelStatistics, RunningStatsNorm):
    """Shared base of the from-scratch batch-norm layers: torch's state, our math, statistics
    reported per channel (:class:`bnlab.nn.stats.ChannelStatistics`)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self.momentum_factor()
        running_mean, running_var = self.buffers_for_call()
        # self.fast: the eager fast path (batchnorm_fast.py), else this file's Functions.
        return batch_norm(input, running_mean, running_var, self.weight, self.bias,
                          self.uses_batch_stats(), factor, self.eps, fast=self.fast)


_ARGS_DOC = r"""
    Args:
        num_features: number of features or channels :math:`C` of the input
        eps: a value added to the denominator for numerical stability. Must be positive when
            batch statistics are used and non-negative otherwise (checked at call time, as in
            torch). Default: 1e-5
        momentum: the value used for the running_mean and running_var computation. Can be set
            to ``None`` for cumulative moving average (i.e. simple average). Default: 0.1
        affine: a boolean value that when set to ``True``, this module has learnable affine
            parameters. Default: ``True``
        track_running_stats: a boolean value that when set to ``True``, this module tracks the
            running mean and variance, and when set to ``False``, this module does not track
            such statistics, and initializes statistics buffers :attr:`running_mean`,
            :attr:`running_var` and :attr:`num_batches_tracked` as ``None``. When these
            buffers are ``None``, this module always uses batch statistics, in both training
            and eval modes. Default: ``True``
        device, dtype: factory arguments for the parameters and buffers.
        bias: (keyword-only) if ``False``, the layer learns no additive bias (only relevant
            if :attr:`affine` is ``True``). Default: ``True``
        fast: (keyword-only) eager calls take the fast path (:mod:`bnlab.nn.batchnorm_fast`);
            ``False`` runs the reference code of :mod:`bnlab.nn.batchnorm`, forward and
            backward. ``torch.compile`` always traces the reference. Default: ``True``
"""

_MATH_DOC = r"""
    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    The mean and standard-deviation are calculated per channel over the mini-batch (every
    dimension except dimension 1) and :math:`\gamma` (``weight``, initialized to 1) and
    :math:`\beta` (``bias``, initialized to 0) are learnable vectors of size `C`. In training
    mode the variance is the biased estimator, ``torch.var(input, correction=0)``, while the
    value folded into the running variance is the unbiased one, ``correction=1``:

    .. math::

        \hat{x}_\text{new} = (1 - \text{momentum}) \times \hat{x}
        + \text{momentum} \times x_t

    (with :math:`\text{momentum} = 1/\text{num\_batches\_tracked}` when ``momentum=None``).
    In eval mode the running estimates normalize the input.

    The backward pass is derived by hand (see :mod:`bnlab.nn.batchnorm`):

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} \left(
        g - \frac{1}{n}\sum g - \hat{x} \cdot \frac{1}{n} \sum g \hat{x} \right), \quad
        \frac{\partial L}{\partial \gamma} = \sum g \hat{x}, \quad
        \frac{\partial L}{\partial \beta} = \sum g

    where :math:`g = \partial L/\partial y` and :math:`n` is the number of values per channel.

    Half-precision (float16/bfloat16) inputs are computed in float32 and returned in the
    input dtype; parameters may be float32 or the input's dtype (the CPU kernel's rules).
"""


class BatchNorm1d(_BatchNorm):
    __doc__ = (
        r"""Batch Normalization over a 2D or 3D input, written from scratch.

    Drop-in replacement for :class:`torch.nn.BatchNorm1d` (same constructor, parameters,
    buffers, state dict and errors).
"""
        + _MATH_DOC
        + _ARGS_DOC
        + r"""
    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`
        - Output: same shape as input

    Examples::

        >>> m = BatchNorm1d(100)
        >>> output = m(torch.randn(20, 100))
    """
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_BatchNorm):
    __doc__ = (
        r"""Batch Normalization over a 4D input, written from scratch.

    Drop-in replacement for :class:`torch.nn.BatchNorm2d` (same constructor, parameters,
    buffers, state dict and errors). ``channels_last`` inputs give ``channels_last`` outputs
    and input gradients.
"""
        + _MATH_DOC
        + _ARGS_DOC
        + r"""
    Shape:
        - Input: :math:`(N, C, H, W)`
        - Output: same shape as input

    Examples::

        >>> m = BatchNorm2d(100)
        >>> output = m(torch.randn(20, 100, 35, 45))
    """
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_BatchNorm):
    __doc__ = (
        r"""Batch Normalization over a 5D input, written from scratch.

    Drop-in replacement for :class:`torch.nn.BatchNorm3d` (same constructor, parameters,
    buffers, state dict and errors).
"""
        + _MATH_DOC
        + _ARGS_DOC
        + r"""
    Shape:
        - Input: :math:`(N, C, D, H, W)`
        - Output: same shape as input

    Examples::

        >>> m = BatchNorm3d(100)
        >>> output = m(torch.randn(20, 100, 35, 45, 10))
    """
    )

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
