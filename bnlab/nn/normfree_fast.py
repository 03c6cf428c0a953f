r"""The eager fast path of FRN, EvoNorm B0 (training) and EvoNorm S0: hand-derived backwards.

The references (:func:`bnlab.nn.frn.filter_response_norm`, :func:`bnlab.nn.evonorm.evonorm_b0`,
:func:`bnlab.nn.evonorm.evonorm_s0`) are plain tensor ops that autograd differentiates; their
backward walks every intermediate through main memory, and several of torch's elementwise
backwards (``maximum``'s tie handling, ``where``/``masked_fill`` with a mask, ``pow``'s) make
extra passes over the whole tensor. Here each layer is one :class:`torch.autograd.Function`:

* the backward is written out (below): per-row factors (one value per (sample, channel) row)
  are folded, masks come from the sign of a pre-activation (``threshold_backward``, one pass),
  the input gradient is accumulated in place;
* forward and backward walk the tensor a slice of samples at a time
  (:func:`bnlab.nn.passes.sample_slices`), so a slice's intermediates stay in the CPU cache
  between the ops on it; only the input and per-row statistics are saved, and the backward
  recomputes the elementwise intermediates of its slice (cheaper than reading them back).
  B0 needs batch statistics first, so its forward makes a statistics pass and its backward
  a final pass for the batch variance's term.

The values are the references' (tested against them in float64); ``torch.compile`` always
traces the references, and a backward with ``create_graph=True`` differentiates the reference
(recomputed from the saved inputs), so double backward stays exact.

Inputs are ``(N, C, *)`` tensors in the compute dtype and ``(C,)`` parameters in the same dtype
(the wrappers at the end cast). Notation: ``g`` is the gradient of the output, sums
:math:`\sum_l` run over a row's L positions, ``rowdot(a, b)`` = :math:`\sum_l a b`.

FRN (``r = 1/sqrt(nu2 + eps)`` and ``s = gamma r`` per row, ``a = s x + beta - tau``,
``z = relu(a) + tau``)::

    g' = g [a > 0]                  d beta = sum g'          d tau = sum g - sum g'
    D  = rowdot(g', x)              d gamma = sum_n D r      d eps = -1/2 sum gamma D r^3
    d x = s g' - (gamma D r^3 / L) x

EvoNorm S0 (``sig = sigmoid(v x)``, ``u = x sig``, ``s = gamma r_g`` with ``r_g = 1/sqrt(var_g
+ eps)`` of the row's group of M values, ``y = s u + beta``)::

    E  = rowdot(g, u)               d gamma = sum_n E r_g    d var_g = -1/2 r_g^3 sum_group E gamma
    du = s g                        w = du u (1 - sig)       d v = sum rowdot(w, x)
    d x = du sig + v w + (2 d var_g / M) (x - mu_g)

EvoNorm B0 in training (``b = sqrt(var_B + eps)`` per channel, ``i = sqrt(var_I + eps)`` per
row, ``d = v x + i - b``, ``den = max(v x + i, b)`` = relu(d) + b, ``o = x / den``,
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

from bnlab.nn.functional import compute_dtype, group_means, per_channel, per_row, row_sums
from bnlab.nn.passes import sample_slices

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


def _per_row_empty(x: Tensor) -> Tensor:
    """An uninitialized ``(N, C)`` tensor of ``x``'s dtype and device: a value per row."""
    return x.new_empty(x.shape[:2])


class _FilterResponseNormFn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, tau: Tensor,  # type: ignore[override]
                eps: Tensor | float, reference: Reference) -> Tensor:
        ndim, length = x.dim(), math.prod(x.shape[2:])
        gamma, shift = per_channel(weight, ndim), per_channel(bias - tau, ndim)
        rstd, z = _per_row_empty(x), torch.empty_like(x)
        for s in sample_slices(x):
            rstd[s] = torch.rsqrt(row_sums(x[s].square()) / length + eps)  # r
            pre = torch.mul(x[s], per_row(rstd[s], ndim) * gamma).add_(shift)  # a
            torch.clamp_min(pre, 0, out=z[s]).add_(per_channel(tau, ndim))
        learned = [eps] if isinstance(eps, Tensor) else []  # a 0-d tensor: learned
        ctx.save_for_backward(x, weight, bias, tau, rstd, *learned)
        ctx.eps, ctx.reference = eps, reference
        return z

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, tau, rstd, *learned = ctx.saved_tensors
        if torch.is_grad_enabled():
            inputs = (x, weight, bias, tau, learned[0] if learned else ctx.eps)
            return *_reference_grads(ctx.reference, inputs, ctx.needs_input_grad[:5], g), None
        ndim, length, g = x.dim(), math.prod(x.shape[2:]), _layout_of(g, x)
        gamma, shift = per_channel(weight, ndim), per_channel(bias - tau, ndim)
        d_x, dot, passed_sums, g_sums = (torch.empty_like(x), _per_row_empty(x),
                                         _per_row_empty(x), _per_row_empty(x))
        for s in sample_slices(x):
            scale = per_row(rstd[s], ndim) * gamma  # s
            pre = torch.mul(x[s], scale).add_(shift)  # a, recomputed
            passed = torch.ops.aten.threshold_backward(g[s], pre, 0)  # g' = g [a > 0]
            passed_sums[s], g_sums[s] = row_sums(passed), row_sums(g[s])
            dot[s] = _rowdot(passed, x[s])  # D
            k = per_row(dot[s] * rstd[s].pow(3), ndim) * gamma  # gamma D r^3
            torch.mul(passed, scale, out=d_x[s]).addcmul_(x[s], k, value=-1.0 / length)
        d_bias = passed_sums.sum(0)
        d_eps = -0.5 * (dot * rstd.pow(3) * weight).sum() if learned else None
        return d_x, (dot * rstd).sum(0), d_bias, g_sums.sum(0) - d_bias, d_eps, None


class _EvoNormS0Fn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int, weight: Tensor, bias: Tensor,  # type: ignore[override]
                v: Tensor, eps: float, reference: Reference) -> Tensor:
        ndim = x.dim()
        size = x.shape[1] // groups * math.prod(x.shape[2:])  # M, values per group
        mean, rstd, y = _per_row_empty(x), _per_row_empty(x), torch.empty_like(x)
        for s in sample_slices(x):
            mean[s] = group_means(row_sums(x[s]), groups, size)
            squares = row_sums((x[s] - per_row(mean[s], ndim)).square())
            rstd[s] = torch.rsqrt(group_means(squares, groups, size) + eps)
            sig = torch.sigmoid(x[s] * per_channel(v, ndim))
            torch.mul(x[s], sig, out=y[s]).mul_(per_row(rstd[s], ndim) * per_channel(weight, ndim))
            y[s].add_(per_channel(bias, ndim))
        ctx.save_for_backward(x, weight, bias, v, mean, rstd)
        ctx.groups, ctx.size, ctx.reference = groups, size, reference
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, v, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            needs = tuple(ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
            d_x, d_weight, d_bias, d_v = _reference_grads(ctx.reference, (x, weight, bias, v),
                                                          needs, g)
            return d_x, None, d_weight, d_bias, d_v, None, None
        ndim, g = x.dim(), _layout_of(g, x)
        gamma, v_c = per_channel(weight, ndim), per_channel(v, ndim)
        d_x, dot, wx_dot, g_sums = (torch.empty_like(x), _per_row_empty(x), _per_row_empty(x),
                                    _per_row_empty(x))
        for s in sample_slices(x):
            sig = torch.sigmoid(x[s] * v_c)  # recomputed
            u = x[s] * sig
            dot[s] = _rowdot(g[s], u)  # E
            # k = 2 d var_g / M = -r_g^3 (1/M) sum_group E gamma; d x += k (x - mu_g)
            k = -rstd[s].pow(3) * group_means(dot[s] * weight, ctx.groups, ctx.size)
            k = per_row(k, ndim)
            du = g[s] * (per_row(rstd[s], ndim) * gamma)
            w = du * u
            w.addcmul_(w, sig, value=-1.0)  # du u (1 - sig)
            wx_dot[s], g_sums[s] = _rowdot(w, x[s]), row_sums(g[s])
            torch.mul(du, sig, out=d_x[s]).addcmul_(w, v_c).addcmul_(x[s], k)
            d_x[s].sub_(k * per_row(mean[s], ndim))
        return (d_x, None, (dot * rstd).sum(0), g_sums.sum(0), wx_dot.sum(0), None, None)


class _EvoNormB0TrainFn(Function):
    @staticmethod
    def _den(x: Tensor, v: Tensor, instance_std: Tensor, batch_std: Tensor
             ) -> tuple[Tensor, Tensor]:
        """``(v x + i, den)`` for a slice, ``den = max(v x + i, b)``."""
        ndim = x.dim()
        right = torch.mul(x, per_channel(v, ndim)).add_(per_row(instance_std, ndim))
        return right, torch.maximum(right, batch_std)

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, v: Tensor,  # type: ignore[override]
                eps: float, reference: Reference) -> tuple[Tensor, Tensor]:
        ndim, length = x.dim(), math.prod(x.shape[2:])
        slices = sample_slices(x)
        row_mean, row_var = _per_row_empty(x), _per_row_empty(x)
        for s in slices:  # the statistics pass
            row_mean[s] = row_sums(x[s]) / length
            row_var[s] = row_sums((x[s] - per_row(row_mean[s], ndim)).square()) / length
        batch_mean = row_mean.mean(0)
        batch_var = (row_var + (row_mean - batch_mean).square()).mean(0)  # total variance
        batch_std = per_channel(torch.sqrt(batch_var + eps), ndim)  # b
        instance_std = torch.sqrt(row_var + eps)  # i
        y = torch.empty_like(x)
        for s in slices:
            _, den = _EvoNormB0TrainFn._den(x[s], v, instance_std[s], batch_std)
            torch.div(x[s], den, out=y[s]).mul_(per_channel(weight, ndim))
            y[s].add_(per_channel(bias, ndim))
        ctx.save_for_backward(x, weight, bias, v, row_mean, batch_mean, instance_std, batch_std)
        ctx.reference = reference
        ctx.mark_non_differentiable(batch_var)
        return y, batch_var

    @staticmethod
    def backward(ctx: Any, g: Tensor, _g_var: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias, v, row_mean, batch_mean, instance_std, batch_std = ctx.saved_tensors
        if torch.is_grad_enabled():
            return *_reference_grads(ctx.reference, (x, weight, bias, v),
                                     ctx.needs_input_grad[:4], g), None, None
        ndim, length, g = x.dim(), math.prod(x.shape[2:]), _layout_of(g, x)
        slices = sample_slices(x)
        d_x = torch.empty_like(x)
        sums = {k: _per_row_empty(x) for k in ("q", "passed", "g_o", "passed_x", "g")}
        for s in slices:
            right, den = _EvoNormB0TrainFn._den(x[s], v, instance_std[s], batch_std)  # recomputed
            pre = right.sub_(batch_std)  # d = v x + i - b: its sign picks the side of the max
            out = x[s] / den
            p = torch.mul(g[s], per_channel(weight, ndim)).div_(den)  # gamma g / den
            minus_q = torch.mul(p, out, out=den)  # -(d den), in den's buffer: sign folded below
            passed = torch.ops.aten.threshold_backward(minus_q, pre, 0)  # -(d den) [d > 0]
            sums["q"][s], sums["passed"][s] = row_sums(minus_q), row_sums(passed)
            sums["g_o"][s], sums["passed_x"][s] = _rowdot(g[s], out), _rowdot(passed, x[s])
            sums["g"][s] = row_sums(g[s])
            torch.addcmul(p, passed, per_channel(-v, ndim), out=d_x[s])  # p + v r
        k_row = -sums["passed"] / (instance_std * length)  # 2 d var_I / L
        d_batch_var = (sums["passed"].sum(0) - sums["q"].sum(0)) / (2 * batch_std.flatten())
        k_batch = d_batch_var * (2.0 / (x.shape[0] * length))  # 2 d var_B / n
        k = per_row(k_row + k_batch, ndim)
        shift = per_row(k_row * row_mean + k_batch * batch_mean, ndim)
        for s in slices:  # the batch variance's term needs every slice's sums
            d_x[s].addcmul_(x[s], k[s]).sub_(shift[s])
        return (d_x, sums["g_o"].sum(0), sums["g"].sum(0), -sums["passed_x"].sum(0), None, None)


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
