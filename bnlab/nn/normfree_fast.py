r"""The eager fast path of FRN, EvoNorm B0 (training) and EvoNorm S0: hand-derived backwards.

The references (:func:`bnlab.nn.frn.filter_response_norm`, :func:`bnlab.nn.evonorm.evonorm_b0`,
:func:`bnlab.nn.evonorm.evonorm_s0`) are plain tensor ops that autograd differentiates; their
backward walks every intermediate, and several of torch's elementwise backwards (``maximum``'s
tie handling, ``where``/``masked_fill`` with a mask, ``pow``'s) make extra passes over the whole
tensor. Here each layer is one :class:`torch.autograd.Function` whose backward is written out,
so forward and backward together make a handful of passes: per-row factors (one value per
(sample, channel) row, ``(N, C, 1)``) are folded, masks come from the sign of a saved
pre-activation (``threshold_backward``, one pass), and the input gradient is accumulated in
place. The values are the references' (tested against them in float64); ``torch.compile``
always traces the references, and a backward with ``create_graph=True`` differentiates the
reference (recomputed from the saved inputs), so double backward stays exact.

Inputs are ``(N, C, L)`` rows in the compute dtype and ``(C,)`` parameters in the same dtype
(the layers cast before calling). Notation: ``g`` is the gradient of the output, sums
:math:`\sum_l` run over a row's L positions, ``rowdot(a, b)`` = :math:`\sum_l a b`.

FRN (``s = gamma / sqrt(nu2 + eps)`` per row, ``a = s x + beta - tau``, ``z = relu(a) + tau``)::

    g' = g [a > 0]                  d beta = sum g'          d tau = sum g - sum g'
    D  = rowdot(g', x)              d gamma = sum_n D r      d eps = -1/2 sum gamma D r^3
    d x = s g' - (gamma D r^3 / L) x

EvoNorm S0 (``sig = sigmoid(v x)``, ``u = x sig``, ``s = gamma r_g`` with ``r_g = 1/sqrt(var_g
+ eps)`` of the row's group of M values, ``y = s u + beta``)::

    E  = rowdot(g, u)               d gamma = sum_n E r_g    d var_g = -1/2 r_g^3 sum_group E gamma
    du = s g                        w = du u (1 - sig)       d v = sum rowdot(w, x)
    d x = du sig + v w + (2 d var_g / M) (x - mu_g)

EvoNorm B0 in training (``b = sqrt(var_B + eps)`` per channel, ``i = sqrt(var_I + eps)`` per
row, ``d = v x + i - b``, ``den = relu(d) + b`` = max(b, v x + i), ``o = x / den``,
``y = gamma o + beta``)::

    p   = gamma g / den             d gamma = sum rowdot(g, o)        d beta = sum g
    q   = -p o  (d den)             r = q [d > 0]                     d v = sum rowdot(r, x)
    d var_I = sum_l r / (2 i)       d var_B = (sum q - sum r) / (2 b)
    d x = p + v r + (2 d var_I / L) (x - mu_I) + (2 d var_B / n) (x - mu_B)

B0's batch variance comes from the per-row statistics, by the law of total variance: the mean of
the instance variances plus the variance of the instance means (both terms non-negative, no
cancellation; equal rows, so plain means).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from bnlab.nn.functional import compute_dtype, per_channel, per_row, reduce_dims, row_sums

__all__ = ["evonorm_b0_train", "evonorm_s0", "filter_response_norm"]

Reference = Callable[..., Tensor]
"""The reference formula as a function of the Function's tensor inputs (and FRN's ``eps``):
differentiated when a backward needs a graph."""


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``rowdot(a, b)``: per (sample, channel) ``sum_l a * b`` of two ``(N, C, *)`` tensors,
    ``(N, C)``."""
    return row_sums(a * b)


def _layout_of(g: Tensor, x: Tensor) -> Tensor:
    """``g`` in ``x``'s memory layout (a copy only when they differ), so that the input
    gradient comes out in the input's layout, as torch's norm layers give it."""
    return g if g.stride() == x.stride() else torch.empty_like(x).copy_(g)


def _reference_grads(reference: Reference, inputs: tuple[Any, ...], needs: tuple[bool, ...],
                     grad: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients of ``reference(*inputs)`` for a backward with ``create_graph=True``: the
    saved inputs are the graph's own, so these gradients are differentiable in turn."""
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(reference(*inputs), wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in needs)


class _FilterResponseNormFn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, tau: Tensor,  # type: ignore[override]
                eps: Tensor | float, reference: Reference) -> Tensor:
        ndim = x.dim()
        nu2 = row_sums(x.square()) / math.prod(x.shape[2:])
        rstd = per_row(torch.rsqrt(nu2 + eps), ndim)  # r, (N, C, 1, ...)
        scale = rstd * per_channel(weight, ndim)
        pre = torch.mul(x, scale).add_(per_channel(bias - tau, ndim))  # a = s x + beta - tau
        learned = [eps] if isinstance(eps, Tensor) else []  # a 0-d tensor: learned
        ctx.save_for_backward(x, weight, bias, tau, pre, rstd, *learned)
        ctx.eps, ctx.reference = eps, reference
        return torch.relu(pre).add_(per_channel(tau, ndim))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, tau, pre, rstd, *learned = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, tau, learned[0] if learned else ctx.eps)
            return *_reference_grads(ctx.reference, inputs, ctx.needs_input_grad[:5], g), None
        ndim, dims, g = x.dim(), reduce_dims(x), _layout_of(g, x)
        gamma = per_channel(weight, ndim)
        passed = torch.ops.aten.threshold_backward(g, pre, 0)  # g' = g [a > 0]
        d_bias = passed.sum(dims)
        dot = per_row(_rowdot(passed, x), ndim)  # D
        k = dot * rstd.pow(3) * gamma  # gamma D r^3
        d_eps = -0.5 * k.sum() if learned else None
        d_x = passed.mul_(rstd * gamma).addcmul_(x, k, value=-1.0 / math.prod(x.shape[2:]))
        d_weight = (dot * rstd).sum(dims)
        return d_x, d_weight, d_bias, g.sum(dims) - d_bias, d_eps, None


class _EvoNormS0Fn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int, weight: Tensor, bias: Tensor,  # type: ignore[override]
                v: Tensor, eps: float, reference: Reference) -> Tensor:
        n, c, ndim = x.shape[0], x.shape[1], x.dim()
        size = c // groups * math.prod(x.shape[2:])  # M, values per group

        def group_mean(sums: Tensor) -> Tensor:  # (N, C) row sums -> their group's mean, (N, C)
            return (sums.view(n, groups, -1).sum(-1) / size).repeat_interleave(c // groups, 1)

        mean = per_row(group_mean(row_sums(x)), ndim)
        rstd = per_row(torch.rsqrt(group_mean(row_sums((x - mean).square())) + eps), ndim)
        sig = torch.sigmoid(x * per_channel(v, ndim))
        u = x * sig
        ctx.save_for_backward(x, weight, bias, v, sig, u, mean, rstd)
        ctx.groups, ctx.size, ctx.reference = groups, size, reference
        return torch.mul(u, rstd * per_channel(weight, ndim)).add_(per_channel(bias, ndim))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, v, sig, u, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
            d_x, d_weight, d_bias, d_v = _reference_grads(ctx.reference, (x, weight, bias, v),
                                                          needs, g)
            return d_x, None, d_weight, d_bias, d_v, None, None
        n, c, ndim, dims = x.shape[0], x.shape[1], x.dim(), reduce_dims(x)
        g = _layout_of(g, x)
        groups, gamma = ctx.groups, per_channel(weight, ndim)
        dot = per_row(_rowdot(g, u), ndim)  # E
        group_dot = row_sums(dot * gamma).view(n, groups, -1).sum(-1)  # sum over the group
        d_var = -0.5 * rstd.pow(3) * per_row(group_dot.repeat_interleave(c // groups, 1), ndim)
        k = d_var * (2.0 / ctx.size)  # d x += k (x - mu_g)
        du = g * (rstd * gamma)
        w = du * u
        w.addcmul_(w, sig, value=-1.0)  # du u (1 - sig)
        d_v = _rowdot(w, x).sum(0)
        d_x = du.mul_(sig).addcmul_(w, per_channel(v, ndim)).addcmul_(x, k).sub_(k * mean)
        return d_x, None, (dot * rstd).sum(dims), g.sum(dims), d_v, None, None


class _EvoNormB0TrainFn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, v: Tensor,  # type: ignore[override]
                eps: float, reference: Reference) -> tuple[Tensor, Tensor]:
        ndim, length = x.dim(), math.prod(x.shape[2:])
        row_mean = row_sums(x) / length
        row_var = row_sums((x - per_row(row_mean, ndim)).square()) / length
        batch_mean = row_mean.mean(0)
        batch_var = (row_var + (row_mean - batch_mean).square()).mean(0)  # total variance
        batch_std = per_channel(torch.sqrt(batch_var + eps), ndim)  # b
        instance_std = per_row(torch.sqrt(row_var + eps), ndim)  # i
        pre = torch.mul(x, per_channel(v, ndim)).add_(instance_std - batch_std)  # v x + i - b
        den = torch.relu(pre).add_(batch_std)  # max(b, v x + i)
        out = x / den
        ctx.save_for_backward(x, weight, bias, v, pre, den, out, row_mean, batch_mean,
                              instance_std, batch_std)
        ctx.reference = reference
        ctx.mark_non_differentiable(batch_var)
        y = torch.mul(out, per_channel(weight, ndim)).add_(per_channel(bias, ndim))
        return y, batch_var

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_var: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, v, pre, den, out, row_mean, batch_mean, instance_std, batch_std = \
            ctx.saved_tensors
        if torch.is_grad_enabled():
            return *_reference_grads(ctx.reference, (x, weight, bias, v),
                                     ctx.needs_input_grad[:4], g), None, None
        ndim, dims, length = x.dim(), reduce_dims(x), math.prod(x.shape[2:])
        g = _layout_of(g, x)
        p = torch.mul(g, per_channel(weight, ndim)).div_(den)  # gamma g / den
        minus_d_den = p * out  # -(d den): the sign is folded into the uses below
        passed = torch.ops.aten.threshold_backward(minus_d_den, pre, 0)  # -(d den) [d > 0]
        k_row = per_row(row_sums(passed), ndim) / (-instance_std * length)  # 2 d var_I / L
        d_batch_var = (passed.sum(dims) - minus_d_den.sum(dims)) / (2 * batch_std.flatten())
        k_batch = per_channel(d_batch_var * (2.0 / (x.shape[0] * length)), ndim)
        shift = k_row * per_row(row_mean, ndim) + k_batch * per_channel(batch_mean, ndim)
        d_v = -_rowdot(passed, x).sum(0)
        d_x = p.addcmul_(passed, per_channel(-v, ndim)).addcmul_(x, k_row + k_batch).sub_(shift)
        return d_x, _rowdot(g, out).sum(0), g.sum(dims), d_v, None, None


def _compute(t: Tensor, like: Tensor) -> Tensor:
    return t.to(compute_dtype(like.dtype))


def filter_response_norm(input: Tensor, weight: Tensor, bias: Tensor, tau: Tensor,
                         eps: Tensor | float, reference: Reference) -> Tensor:
    """FRN + TLU; ``reference(x, weight, bias, tau, eps)`` is
    :func:`bnlab.nn.frn.filter_response_norm`."""
    if isinstance(eps, Tensor):
        eps = _compute(eps, input)
    params = (_compute(t, input) for t in (weight, bias, tau))
    y = _FilterResponseNormFn.apply(_compute(input, input), *params, eps, reference)
    return y.to(input.dtype)


def evonorm_s0(input: Tensor, groups: int, weight: Tensor, bias: Tensor, v: Tensor, eps: float,
               reference: Reference) -> Tensor:
    """EvoNorm S0; ``reference(x, weight, bias, v)`` is :func:`bnlab.nn.evonorm.evonorm_s0`
    with these ``groups`` and ``eps``."""
    params = (_compute(t, input) for t in (weight, bias, v))
    y = _EvoNormS0Fn.apply(_compute(input, input), groups, *params, eps, reference)
    return y.to(input.dtype)


def evonorm_b0_train(input: Tensor, weight: Tensor, bias: Tensor, v: Tensor, eps: float,
                     reference: Reference) -> tuple[Tensor, Tensor]:
    """EvoNorm B0 with batch statistics: ``(y, batch variance)``, the biased per-channel
    variance detached; ``reference(x, weight, bias, v)`` is :func:`bnlab.nn.evonorm.evonorm_b0`
    with the batch's variance and this ``eps``."""
    params = (_compute(t, input) for t in (weight, bias, v))
    y, batch_var = _EvoNormB0TrainFn.apply(_compute(input, input), *params, eps, reference)
    return y.to(input.dtype), batch_var
