"""The eager fast path of the from-scratch batch norm: the reference's formulas, reorganized
for speed on the CPU.

:mod:`bnlab.nn.batchnorm` is the reference (read it first); this module computes the same
formulas for eager calls with fewer passes over memory:

* the statistics read ``x`` from memory once (:func:`_moments`): each cache-sized slice of
  samples (:func:`bnlab.nn.passes.sample_slices`) is summed, and its squared deviations from
  its own mean formed in one fused pass and summed, while it is in cache; the slices' moments
  are merged exactly (Chan, Golub & LeVeque 1979);
* the output is then one pass, ``x * scale + shift``, into a fresh buffer; the backward's
  sums are taken a slice at a time too, so a product is summed while it is in cache; only
  ``x`` plus per-channel vectors are saved;
* per-channel sums of standard-contiguous tensors as row sums first
  (:func:`bnlab.nn.passes.channel_sum`);
* these shortcuts need a channel's ``|mean|`` to be within a few standard deviations
  (:func:`_is_well_conditioned`); otherwise the corrected two-pass variance (Chan, Golub &
  LeVeque 1983) about the mean is computed and ``x`` is centred before scaling, forward and
  backward, which stays exact where ``|mean| >> std`` (more accurate there than the reference
  and torch's kernel).

:class:`FastTrainFn` and :class:`FastEvalFn` have the signatures of the reference's
``_BatchNormTrainFn`` and ``_BatchNormEvalFn``; :func:`bnlab.nn.batchnorm.batch_norm` takes
them for eager calls with ``fast=True`` (the layers pass their ``fast`` option), on any device
(the slices and the well-conditioned check are CPU-only). ``torch.compile`` traces the
reference instead. A backward with ``create_graph=True`` (double backward) differentiates the
formulas of :mod:`bnlab.nn.functional` with autograd. :func:`batch_stats_fast` is
:func:`bnlab.nn.functional.batch_stats` in one read of ``x`` (Batch Renorm's corrections).
``tests/test_batchnorm_fast.py`` checks this module against the reference and the statistics
against ``batch_stats``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from bnlab.nn.compat import (
    output_memory_format,
    requested_grads,
    save_param_dtypes,
    suggest_memory_format,
)
from bnlab.nn.functional import (
    affine,
    batch_stats,
    compute_dtype,
    normalize,
    per_channel,
    reduce_dims,
)
from bnlab.nn.passes import channel_sum, sample_slices, scale_shift, squared_deviations

__all__ = ["FastEvalFn", "FastTrainFn", "batch_stats_fast"]


# Channels whose |mean| is at most this many standard deviations are "well conditioned": the
# float rounding error of the mean (~ulp(mean)) stays below ~1e-6 std there, so the corrected
# two-pass term and the centring in the backward can be skipped (see _train_backward_fast).
_MAX_MEAN_OVER_STD = 16.0


# --------------------------------------------------------------------------------------------
# Passes over memory
# --------------------------------------------------------------------------------------------


def _empty(x: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    # Explicit allocation gives canonical strides in the wanted format, whatever x's strides.
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


def _is_well_conditioned(x: Tensor, center: Tensor, var: Tensor, eps: float) -> bool:
    """Whether every channel has |mean| <= _MAX_MEAN_OVER_STD * std (CPU tensors only).

    Then the rounding error of the computed mean (about ulp(mean)) is negligible next to the
    standard deviation and the cheaper formulas apply. The check reads one number back to
    Python; on accelerators that would be a device sync per layer, so they always take the
    robust path.
    """
    if x.device.type != "cpu" or center.numel() == 0:
        return False
    ratio = center.abs() * torch.rsqrt(var + eps)
    return bool(ratio.max() <= _MAX_MEAN_OVER_STD)


def _slice_buffer(t: Tensor, slices: list[slice], dtype: torch.dtype) -> Tensor:
    """A reusable buffer for one slice of ``t`` (the last slice uses a prefix of it)."""
    return _empty(t[slices[0]], dtype, suggest_memory_format(t))


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel ``sum(a * b)`` over every dim except 1, a slice of samples at a time."""
    slices = sample_slices(a)
    if len(slices) == 1:
        return channel_sum(a * b)
    buf = _slice_buffer(a, slices, torch.result_type(a, b))
    total = torch.zeros(a.shape[1], dtype=buf.dtype, device=a.device)
    for s in slices:
        part = buf[: a[s].shape[0]]
        total += channel_sum(torch.mul(a[s], b[s], out=part))
    return total


def _centered_square_sum(x: Tensor, center: Tensor, out: Tensor) -> Tensor:
    """``out = x - center`` and the per-channel ``sum(out**2)``, a slice of samples at a time
    (each slice is squared while it is still in cache)."""
    slices = sample_slices(out)  # (sized by out: half inputs are centred into float32)
    buf = _slice_buffer(out, slices, out.dtype)
    total = torch.zeros(x.shape[1], dtype=out.dtype, device=x.device)
    for s in slices:
        xc = torch.sub(x[s], center, out=out[s])
        total += channel_sum(torch.mul(xc, xc, out=buf[: xc.shape[0]]))
    return total


def _grad_sums(
    g: Tensor, x: Tensor, center: Tensor | None, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * v)``: ``v = x``, or ``v = x - center`` written into
    ``out`` when ``center`` is given. A slice of samples at a time, so each slice of ``g`` and
    ``v`` is read the second time from cache."""
    slices = sample_slices(g)
    buf = _slice_buffer(g, slices, g.dtype)
    sum_g = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
    dot = torch.zeros_like(sum_g)
    for s in slices:
        gs = g[s]
        v = x[s] if center is None else torch.sub(x[s], center, out=out[s])
        sum_g += channel_sum(gs)
        dot += channel_sum(torch.mul(gs, v, out=buf[: gs.shape[0]]))
    return sum_g, dot


def _moments(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, biased variance)`` of ``x`` in ``dtype``, reading ``x`` from memory
    once: each slice of samples is summed, centred on its own mean and its squares summed
    while it is in cache (a two-pass per slice); the slices' moments are then merged exactly
    (Chan, Golub & LeVeque 1979: the sum of squared deviations is the slices' sums plus each
    slice's count times its squared distance to the mean)."""
    slices = sample_slices(x)
    ndim, per_sample = x.dim(), x[0].numel() // x.shape[1]
    sums = x.new_empty((len(slices), x.shape[1]), dtype=dtype)
    squares = torch.empty_like(sums)
    counts = []
    for i, s in enumerate(slices):
        xs = x[s]
        counts.append(xs.shape[0] * per_sample)
        channel_sum(xs, dtype, out=sums[i])
        center = per_channel(sums[i] / counts[-1], ndim)
        channel_sum(squared_deviations(xs, center), out=squares[i])
    n = sum(counts)
    mean = sums.sum(0) / n
    if len(slices) == 1:
        return mean, squares[0] / n
    count = torch.tensor(counts, dtype=dtype, device=x.device).unsqueeze(1)
    spread = (count * (sums / count - mean).square()).sum(0)
    return mean, (squares.sum(0) + spread) / n


def batch_stats_fast(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`bnlab.nn.functional.batch_stats` (per-channel mean and biased variance, in the
    compute dtype) reading ``x`` once, with no full-size temporary (:func:`_moments`). Not
    differentiable (grad mode off: Batch Renorm's corrections)."""
    return _moments(x, compute_dtype(x.dtype))


# --------------------------------------------------------------------------------------------
# autograd Functions (signatures of the reference's _BatchNormTrainFn and _BatchNormEvalFn)
# --------------------------------------------------------------------------------------------


class FastTrainFn(Function):
    """Batch statistics: ``forward(x, weight, bias, eps) -> (y, mean, var)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        cdtype = compute_dtype(x.dtype)
        ndim = x.dim()
        n = x.numel() // x.shape[1]
        center, var = _moments(x, cdtype)
        y = _empty(x, cdtype, output_memory_format(x))
        well_conditioned = _is_well_conditioned(x, center, var, eps)
        if well_conditioned:
            # y = (x - mean) * scale + beta as x * scale + (beta - mean * scale): one pass.
            delta, v = torch.zeros_like(center), x
        else:
            # Corrected two-pass: center (the mean above) carries a rounding error of about
            # ulp(mean), which matters once |mean| >> std. xc = x - center is exact for values
            # near the mean, and delta = mean(xc) recovers the error: mean = center + delta,
            # var = mean(xc^2) - delta^2. xc lives in the output buffer (half inputs are
            # promoted to float32 inside the subtraction).
            var = _centered_square_sum(x, per_channel(center, ndim), out=y) / n
            delta = channel_sum(y) / n
            var = (var - delta * delta).clamp_min_(0.0)
            v = y
        mean = center + delta
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight.to(cdtype) * invstd
        origin = center if well_conditioned else delta  # y = (v - origin) * scale + beta
        offset = -origin * scale if bias is None else bias.to(cdtype) - origin * scale
        y = scale_shift(v, per_channel(scale, ndim), per_channel(offset, ndim), out=y)

        ctx.save_for_backward(x, weight, center, delta, invstd)
        ctx.eps = eps
        save_param_dtypes(ctx, weight, bias)
        # The uncentred backward shortcut is only used for well-conditioned float32/64 input.
        ctx.shortcut = well_conditioned and x.dtype == cdtype
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, center, delta, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable grads
            grads = _grads_by_autograd(ctx, grad_y, x, weight, None)
        else:
            grads = _train_backward_fast(
                grad_y, x, weight, center, delta, invstd, ctx.needs_input_grad[0], ctx.shortcut
            )
        return (*requested_grads(ctx, *grads), None)


def _grads_by_autograd(
    ctx: Any, grad_y: Tensor, x: Tensor, weight: Tensor | None, stats: tuple[Tensor, Tensor] | None
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """``(d x, d gamma, d beta)`` as differentiable ops, for a backward with
    ``create_graph=True``: autograd through the forward's formulas (:mod:`bnlab.nn.functional`)
    recomputed from the saved, graph-connected ``x`` and ``weight``, with the batch statistics
    of ``x`` (``stats`` None) or the given, constant ones. Only the grads asked for."""
    need_x, need_w = ctx.needs_input_grad[:2]
    wanted = [t for t, need in ((x, need_x), (weight, need_w)) if need]
    g = grad_y.to(compute_dtype(x.dtype))
    d_bias = g.sum(reduce_dims(g))
    if not wanted:
        return None, None, d_bias
    with torch.enable_grad():
        mean, var = batch_stats(x) if stats is None else stats
        y = affine(normalize(x, mean, var, ctx.eps), weight, None)
        grads = iter(torch.autograd.grad(y, wanted, g, create_graph=True))
    dx = next(grads).contiguous(memory_format=suggest_memory_format(x)) if need_x else None
    return dx, next(grads) if need_w else None, d_bias


def _train_backward_fast(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    center: Tensor,
    delta: Tensor,
    invstd: Tensor,
    need_x: bool,
    shortcut: bool,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """First-order backward: few passes; dx is its only full-size tensor besides the dot's
    product, which is formed a slice of samples at a time where ``sample_slices`` slices.

    The reference's ``dx = scale (g - 1/n sum g - x_hat 1/n sum g x_hat)`` is computed as
    ``dx = k (x - mu) + c + scale g`` with ``k = -scale invstd^2 1/n sum g (x - mu)`` and
    ``c = -scale 1/n sum g``, which needs ``sum g (x - mu)``. With ``shortcut`` (input known
    to be well conditioned, |mean| <= _MAX_MEAN_OVER_STD * std) it is computed without
    centring x, as ``sum g x - mu sum g`` and ``dx = k x + (c - k mu) + scale g``: the
    cancellation costs at most a factor |mean|/std in relative precision. Otherwise
    xc = x - center is materialized (exact, as in the forward) and, with x - mu = xc - delta,
    ``sum g (x - mu) = sum g xc - delta sum g`` and ``dx = k xc + (c - k delta) + scale g``.
    """
    fmt = suggest_memory_format(x)
    cdtype = center.dtype
    # .contiguous: e.g. the grad of y.sum() is an expanded tensor with stride 0.
    g = grad_y.contiguous(memory_format=fmt).to(cdtype)
    ndim = x.dim()
    n = x.numel() // x.shape[1]

    # x - mu = x - center (shortcut: delta is 0, center is the mean), else xc - delta with
    # xc = x - center materialized in a buffer that is reused for dx.
    xc = None if shortcut else _empty(x, cdtype, fmt)
    sum_g, dot = _grad_sums(g, x, None if shortcut else per_channel(center, ndim), out=xc)
    v, offset = (x, center) if shortcut else (xc, delta)
    dot = dot - offset * sum_g  # sum g * (x - mu)
    d_weight = dot * invstd  # sum g * x_hat
    dx = None
    if need_x:
        scale = invstd if weight is None else weight.to(cdtype) * invstd
        k = -scale * invstd * invstd * dot / n
        c = -scale * sum_g / n
        # dx = k * (v - offset) + c + scale * g, slice by slice into one buffer (the second
        # pass reads the slice from cache).
        dx = _empty(x, cdtype, fmt) if shortcut else xc
        k_, shift = per_channel(k, ndim), per_channel(c - k * offset, ndim)
        scale_ = per_channel(scale, ndim)
        for s in sample_slices(dx):
            scale_shift(v[s], k_, shift, out=dx[s]).addcmul_(g[s], scale_)
        dx = dx.to(grad_y.dtype)
    return dx, d_weight, sum_g


class FastEvalFn(Function):
    """Running statistics: ``forward(x, weight, bias, running_mean, running_var, eps) -> y``."""

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
        cdtype = compute_dtype(x.dtype)
        ndim = x.dim()
        mean, var = running_mean.to(cdtype), running_var.to(cdtype)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight.to(cdtype) * invstd
        # (x - mean) * scale + beta, centred first so that values near a huge mean stay exact,
        # a slice at a time into one buffer; mixed half/float operands promote to float32.
        y = _empty(x, cdtype, output_memory_format(x))
        shift = torch.zeros_like(mean) if bias is None else bias.to(cdtype)
        mean_, scale_, shift_ = (per_channel(t, ndim) for t in (mean, scale, shift))
        for s in sample_slices(y):
            scale_shift(torch.sub(x[s], mean_, out=y[s]), scale_, shift_, out=y[s])
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        save_param_dtypes(ctx, weight, bias)
        return y.to(x.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable grads
            grads = _grads_by_autograd(ctx, grad_y, x, weight, (mean, var))
        else:
            needs = ctx.needs_input_grad[:3]
            grads = _eval_backward_fast(grad_y, x, weight, mean, var, ctx.eps, needs)
        return (*requested_grads(ctx, *grads), None, None, None)


def _eval_backward_fast(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """First-order backward of the per-channel affine map, computing only the grads in
    ``needs`` (of x, weight, bias; a frozen layer needs no pass over ``x``)."""
    need_x, need_w, need_b = needs
    fmt = suggest_memory_format(x)
    ndim = x.dim()
    g = grad_y.contiguous(memory_format=fmt)
    invstd = torch.rsqrt(var + eps)
    dx = d_weight = d_bias = None
    if need_x:
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        dx = (g * per_channel(scale, ndim)).to(grad_y.dtype)
    if need_w:
        xc = x.contiguous(memory_format=fmt) - per_channel(mean, ndim)
        d_weight = _channel_dot(g.to(mean.dtype), xc) * invstd
    if need_b:
        d_bias = channel_sum(g, mean.dtype)
    return dx, d_weight, d_bias
