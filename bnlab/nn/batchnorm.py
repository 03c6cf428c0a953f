r"""Batch normalization written from scratch.

The layers in this file are plain :class:`torch.nn.Module` subclasses. They do not subclass
torch's batch-norm classes and never call ``F.batch_norm``, ``torch.batch_norm``,
``torch.native_batch_norm`` or any other native normalization kernel: the statistics, the
normalization and the backward pass are all written out below in ordinary tensor ops.

Everything that is not the math (constructor, parameter and buffer names, ``extra_repr``,
state-dict versioning, the order in which errors are raised, dtype rules, output memory
format) mirrors ``torch/nn/modules/batchnorm.py`` and ``torch.nn.functional.batch_norm`` of
torch 2.14 on CPU, so that a custom layer is a drop-in replacement for a torch one and their
state dicts load into each other.

Notation used throughout (for an input of shape :math:`(N, C, *)`):

* :math:`n = N \cdot \prod *` is the number of values that share one channel,
* sums :math:`\sum` run over every dimension except the channel dimension 1,
* :math:`g = \partial L / \partial y` is the gradient flowing into the layer.

Training mode (batch statistics)::

    mu      = 1/n sum x                          per-channel mean
    var     = 1/n sum (x - mu)^2                 per-channel *biased* variance
    invstd  = 1 / sqrt(var + eps)
    x_hat   = (x - mu) * invstd
    y       = gamma * x_hat + beta  =  (x - mu) * scale + beta,   scale = gamma * invstd

    d beta  = sum g
    d gamma = sum g * x_hat  =  invstd * sum g * (x - mu)
    d x     = gamma * invstd * (g - 1/n sum g - x_hat * 1/n sum g * x_hat)
            = scale * g + k * (x - mu) + c,
              k = -scale * invstd^2 * 1/n sum g * (x - mu),   c = -scale * 1/n sum g

Evaluation mode (running statistics) is an affine map per channel::

    scale   = gamma / sqrt(running_var + eps)
    y       = (x - running_mean) * scale + beta
    d x     = scale * g
    d gamma = sum g * (x - running_mean) / sqrt(running_var + eps)
    d beta  = sum g

Running statistics are updated in training mode (when tracked) with the *unbiased* variance::

    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

Numerics: the variance is a two-pass one (mean first, then the mean of squared deviations),
never E[x^2] - E[x]^2. When a channel's |mean| exceeds 16 standard deviations the rounding
error of the float mean itself matters, and the corrected two-pass algorithm is used (see
``_BatchNormTrainFn.forward``); in eval mode ``x - running_mean`` is formed before scaling.
Reductions and elementwise math run in float32 for float16/bfloat16 inputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm"]

# Input dtypes the CPU kernel accepts; half types are computed in float32 ("opmath") and the
# result is cast back, exactly as torch's CPU kernel does.
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Names torch's C++ error messages use for dtypes ("expected scalar type Float but ...").
_CPP_DTYPE_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}

# Below this many values per (sample, channel) row, summing the rows first gains nothing over
# one reduction over the strided dims.
_MIN_ROW = 16

# The eager layer walks large tensors a slice of samples at a time, about this many bytes per
# slice, so that a product is summed, or a result read again, while it is still in the L2/L3
# cache rather than after a round trip through memory; tensors of fewer than
# _MIN_SLICES such slices are processed whole (the per-slice op overhead would win).
_SLICE_BYTES = 2 * 2**20
_MIN_SLICES = 4

# Channels whose |mean| is at most this many standard deviations are "well conditioned": the
# float rounding error of the mean (~ulp(mean)) stays below ~1e-6 std there, so the corrected
# two-pass term and the centring in the backward can be skipped (see _train_backward_fast).
_MAX_MEAN_OVER_STD = 16.0


def _cpp_dtype_name(dtype: torch.dtype) -> str:
    if dtype in _CPP_DTYPE_NAMES:
        return _CPP_DTYPE_NAMES[dtype]
    name = str(dtype).removeprefix("torch.")  # e.g. float8_e4m3fn -> Float8_e4m3fn
    return name[:1].upper() + name[1:]


# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------


def _strides_like_channels_last(sizes: torch.Size, strides: tuple[int, ...]) -> bool:
    """Python port of c10's ``is_channels_last_strides_{2d,3d}``.

    ``Tensor.suggest_memory_format()`` looks at the *order* of the strides, not at contiguity:
    a sliced channels_last tensor still suggests channels_last. There is no public Python API
    for it, so it is ported here (ambiguous cases fall back to contiguous, as in c10).
    """
    order = (1, 3, 2, 0) if len(sizes) == 4 else (1, 4, 3, 2, 0)
    if strides[1] == 0:  # trivial C dimension: default to NCHW
        return False
    minimum = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < minimum:
            return False
        # N111-like tensors with identical strides are ambiguous: c10 picks contiguous.
        if d == 0 and minimum == strides[1]:
            return False
        minimum = strides[d]
        if sizes[d] > 1:
            minimum *= sizes[d]
    return True


def _suggest_memory_format(x: Tensor) -> torch.memory_format:
    """``x.suggest_memory_format()``: the format torch's CPU kernel gives the grad input."""
    # (Only dense strided tensors get here; the layout is not queried because dynamo forbids
    # reading it inside a custom Function's backward.)
    if x.dim() in (4, 5) and _strides_like_channels_last(x.shape, x.stride()):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _output_memory_format(x: Tensor) -> torch.memory_format:
    """The format torch's CPU kernel gives the forward output: contiguous inputs (including
    ambiguous ones such as channels_last (N, C, 1, 1)) stay contiguous, others as suggested."""
    return torch.contiguous_format if x.is_contiguous() else _suggest_memory_format(x)


def _empty(x: Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    # Explicit allocation gives canonical strides in the wanted format, whatever x's strides.
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _per_channel(t: Tensor, ndim: int) -> Tensor:
    """Reshape a (C,) vector so it broadcasts against an (N, C, *) tensor."""
    return t.view((1, -1) + (1,) * (ndim - 2))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED_FLOATS else dtype


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


def _rows(t: Tensor) -> Tensor | None:
    """View a standard-contiguous (N, C, *) tensor as (N*C, L) rows, if that is worthwhile."""
    if t.dim() < 3 or not t.is_contiguous():
        return None
    n_rows = t.shape[0] * t.shape[1]
    if n_rows == 0 or t.numel() // n_rows < _MIN_ROW:
        return None
    return t.view(n_rows, -1)


def _channel_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Sum over every dim except 1, accumulated and returned in ``dtype`` (default t's)."""
    rows = _rows(t)
    if rows is not None:
        # Summing the contiguous rows first and then over N is a cheaper reduction on CPU
        # than one reduction over the strided dims (0, 2, 3, ...).
        return rows.sum(1, dtype=dtype).view(t.shape[0], t.shape[1]).sum(0)
    return t.sum(_reduce_dims(t), dtype=dtype)


def _sample_slices(t: Tensor) -> list[slice]:
    """Slices of dim 0 of about ``_SLICE_BYTES`` each, or one slice for all of ``t`` when it is
    small, not on the CPU (a GPU gains nothing from CPU-cache-sized pieces, only more kernel
    launches), or when autograd or the compiler must see plain ops (slices write through
    ``out=``).

    Walking slices made the layer's dot products 1.3-1.6x faster at (128, 32..128, H, W) in
    either layout on the 2-core CPU; partial sums change only the summation order.
    """
    n = t.shape[0]
    per_sample = t[0].numel() * t.element_size() if n else 0
    step = max(1, _SLICE_BYTES // per_sample) if per_sample else 1
    if (
        n < _MIN_SLICES * step
        or t.device.type != "cpu"
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return [slice(None)]
    return [slice(i, i + step) for i in range(0, n, step)]


def _slice_buffer(t: Tensor, slices: list[slice], dtype: torch.dtype) -> Tensor:
    """A reusable buffer for one slice of ``t`` (the last slice uses a prefix of it)."""
    return _empty(t[slices[0]], dtype, _suggest_memory_format(t))


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel ``sum(a * b)`` over every dim except 1, a slice of samples at a time."""
    slices = _sample_slices(a)
    if len(slices) == 1:
        return _channel_sum(a * b)  # (also the differentiable form)
    buf = _slice_buffer(a, slices, torch.result_type(a, b))
    total = torch.zeros(a.shape[1], dtype=buf.dtype, device=a.device)
    for s in slices:
        part = buf[: a[s].shape[0]]
        total += _channel_sum(torch.mul(a[s], b[s], out=part))
    return total


def _centered_square_sum(x: Tensor, center: Tensor, out: Tensor) -> Tensor:
    """``out = x - center`` and the per-channel ``sum(out**2)``, a slice of samples at a time
    (each slice is squared while it is still in cache)."""
    slices = _sample_slices(out)  # (sized by out: half inputs are centred into float32)
    buf = _slice_buffer(out, slices, out.dtype)
    total = torch.zeros(x.shape[1], dtype=out.dtype, device=x.device)
    for s in slices:
        xc = torch.sub(x[s], center, out=out[s])
        total += _channel_sum(torch.mul(xc, xc, out=buf[: xc.shape[0]]))
    return total


def _grad_sums(
    g: Tensor, x: Tensor, center: Tensor | None, out: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(g)`` and ``sum(g * v)``: ``v = x``, or ``v = x - center`` written into
    ``out`` when ``center`` is given. A slice of samples at a time, so each slice of ``g`` and
    ``v`` is read the second time from cache."""
    slices = _sample_slices(g)
    buf = _slice_buffer(g, slices, g.dtype)
    sum_g = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
    dot = torch.zeros_like(sum_g)
    for s in slices:
        gs = g[s]
        v = x[s] if center is None else torch.sub(x[s], center, out=out[s])
        sum_g += _channel_sum(gs)
        dot += _channel_sum(torch.mul(gs, v, out=buf[: gs.shape[0]]))
    return sum_g, dot


def _scale_shift(t: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out = t * scale + shift`` with per-channel (broadcast) ``scale`` and ``shift``.

    When ``out`` has channels innermost (NHWC) one ``addcmul`` pass does it: the broadcast
    vectors line up with the vector lanes (0.8 ms against 1.4 ms for ``mul_`` + ``add_`` on a
    (128, 32, 32, 32) tensor). In NCHW both vectors are constant along the inner loop, which
    the CPU kernel does not vectorize (1.5 ms against 1.0 ms), so two passes are used there.
    """
    if out.stride(1) == 1:
        return torch.addcmul(shift, t, scale, out=out)
    return torch.mul(t, scale, out=out).add_(shift)


# --------------------------------------------------------------------------------------------
# autograd Functions
# --------------------------------------------------------------------------------------------


class _BatchNormTrainFn(torch.autograd.Function):
    """Batch norm with batch statistics; hand-derived backward (see module docstring).

    ``forward(x, weight, bias, eps) -> (y, mean, biased_var)``. ``mean`` and ``biased_var`` are
    returned (non-differentiable, in the compute dtype) so the caller can update the running
    statistics outside the Function, where in-place buffer updates are plain module code.

    Three code paths compute the *same* formulas:

    * eager, first order: in-place ops keep the number of passes over memory and of
      full-size temporaries low (this is what the CPU benchmark measures);
    * under ``torch.compile``: straightforward functional ops that Inductor fuses into one
      reduction kernel and one pointwise kernel each way;
    * double backward (``create_graph=True``): the backward is written out of differentiable
      ops and the statistics are recomputed from ``x``, so autograd can differentiate the
      backward itself (``gradgradcheck`` passes).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        cdtype = _compute_dtype(x.dtype)
        ndim = x.dim()
        n = x.numel() // x.shape[1]
        dims = _reduce_dims(x)

        well_conditioned = False
        if torch.compiler.is_compiling():
            # One Welford reduction (numerically stable) + one fused pointwise kernel.
            var, mean = torch.var_mean(x.to(cdtype), dim=dims, correction=0)
            center, delta = mean, torch.zeros_like(mean)
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else weight.to(cdtype) * invstd
            offset = -mean * scale if bias is None else bias.to(cdtype) - mean * scale
            y = x.to(cdtype) * _per_channel(scale, ndim) + _per_channel(offset, ndim)
            y = y.contiguous(memory_format=_output_memory_format(x))
        else:
            # Two-pass variance: center = mean(x) (rounded to the compute dtype), then the
            # mean of squared deviations xc = x - center; unlike E[x^2] - E[x]^2 this does not
            # cancel when |mean| >> std. The centred tensor lives in the buffer that becomes
            # the output; xc * xc is formed a slice at a time (see _sample_slices).
            center = _channel_sum(x, cdtype) / n
            # (half inputs are promoted to float32 inside the subtraction)
            xc = _empty(x, cdtype, _output_memory_format(x))
            var = _centered_square_sum(x, _per_channel(center, ndim), out=xc) / n
            well_conditioned = _is_well_conditioned(x, center, var, eps)
            if well_conditioned:
                delta = torch.zeros_like(center)
            else:
                # Corrected two-pass (Chan, Golub & LeVeque 1983): center carries a rounding
                # error of about ulp(mean), which matters once |mean| >> std. xc = x - center
                # is exact for values near the mean, and delta = mean(xc) recovers the error:
                #   mean = center + delta,   var = mean(xc^2) - delta^2.
                delta = _channel_sum(xc) / n
                var = (var - delta * delta).clamp_min_(0.0)
            mean = center + delta
            invstd = torch.rsqrt(var + eps)
            scale = invstd if weight is None else weight.to(cdtype) * invstd
            offset = -delta * scale if bias is None else bias.to(cdtype) - delta * scale
            # y = (xc - delta) * scale + beta, in place.
            y = _scale_shift(xc, _per_channel(scale, ndim), _per_channel(offset, ndim), out=xc)
        y = y.to(x.dtype)

        # Only x (an input: no extra memory) and per-channel vectors are kept.
        ctx.save_for_backward(x, weight, center, delta, invstd)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The uncentred backward shortcut is only used for well-conditioned float32/64 input
        # (well_conditioned is always False under torch.compile).
        ctx.shortcut = well_conditioned and x.dtype == cdtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, center, delta, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.compiler.is_compiling():
            dx, dw, db = _train_backward_functional(grad_y, x, weight, center + delta, invstd)
        elif torch.is_grad_enabled():  # create_graph=True: must be differentiable
            dx, dw, db = _train_backward_differentiable(grad_y, x, weight, ctx.eps)
        else:
            dx, dw, db = _train_backward_fast(
                grad_y, x, weight, center, delta, invstd, need_x, ctx.shortcut
            )
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None,
            None,
        )


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
    """First-order backward, eager: few passes; dx is its only full-size tensor besides the
    dot's product, which is formed a slice of samples at a time where ``_sample_slices`` slices.

    ``dx = k (x - mu) + c + scale g`` needs ``sum g (x - mu)``. With ``shortcut`` (input known
    to be well conditioned, |mean| <= _MAX_MEAN_OVER_STD * std) it is computed without
    centring x, as ``sum g x - mu sum g`` and ``dx = k x + (c - k mu) + scale g``: the
    cancellation costs at most a factor |mean|/std in relative precision. Otherwise
    xc = x - center is materialized (exact, as in the forward) and, with x - mu = xc - delta,
    ``sum g (x - mu) = sum g xc - delta sum g`` and ``dx = k xc + (c - k delta) + scale g``.
    """
    fmt = _suggest_memory_format(x)
    cdtype = center.dtype
    # .contiguous: e.g. the grad of y.sum() is an expanded tensor with stride 0.
    g = grad_y.contiguous(memory_format=fmt).to(cdtype)
    ndim = x.dim()
    n = x.numel() // x.shape[1]

    # x - mu = x - center (shortcut: delta is 0, center is the mean), else xc - delta with
    # xc = x - center materialized in a buffer that is reused for dx.
    xc = None if shortcut else _empty(x, cdtype, fmt)
    sum_g, dot = _grad_sums(g, x, None if shortcut else _per_channel(center, ndim), out=xc)
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
        k_, shift = _per_channel(k, ndim), _per_channel(c - k * offset, ndim)
        scale_ = _per_channel(scale, ndim)
        for s in _sample_slices(dx):
            _scale_shift(v[s], k_, shift, out=dx[s]).addcmul_(g[s], scale_)
        dx = dx.to(grad_y.dtype)
    return dx, d_weight, sum_g


def _train_backward_functional(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Same formulas as the fast path, written functionally (what Inductor fuses best)."""
    fmt = _suggest_memory_format(x)
    cdtype = mean.dtype
    x = x.contiguous(memory_format=fmt).to(cdtype)
    g = grad_y.contiguous(memory_format=fmt).to(cdtype)
    ndim = x.dim()
    n = x.numel() // x.shape[1]
    dims = _reduce_dims(x)
    xc = x - _per_channel(mean, ndim)
    sum_g = g.sum(dims)
    dot = (g * xc).sum(dims)
    scale = invstd if weight is None else weight.to(cdtype) * invstd
    k = -scale * invstd * invstd * dot / n
    c = -scale * sum_g / n
    dx = g * _per_channel(scale, ndim) + xc * _per_channel(k, ndim) + _per_channel(c, ndim)
    return dx.to(grad_y.dtype), dot * invstd, sum_g


def _train_backward_differentiable(
    grad_y: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward as a differentiable function of (grad_y, x, weight), for double backward.

    The saved mean/invstd are constants to autograd, but they depend on x; so they are
    recomputed here from x with differentiable ops, and the second derivative is exact.
    """
    cdtype = _compute_dtype(x.dtype)
    xf = x.to(cdtype)
    g = grad_y.to(cdtype)
    dims = _reduce_dims(x)
    n = x.numel() // x.shape[1]
    mean = xf.mean(dims, keepdim=True)
    xc = xf - mean
    invstd = torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    x_hat = xc * invstd
    sum_g = g.sum(dims, keepdim=True)
    sum_g_xhat = (g * x_hat).sum(dims, keepdim=True)
    w = 1.0 if weight is None else _per_channel(weight.to(cdtype), x.dim())
    dx = w * invstd * (g - sum_g / n - x_hat * sum_g_xhat / n)
    fmt = _suggest_memory_format(x)
    return (
        dx.to(grad_y.dtype).contiguous(memory_format=fmt),
        sum_g_xhat.flatten(),
        sum_g.flatten(),
    )


class _BatchNormEvalFn(torch.autograd.Function):
    """Batch norm with given (running) statistics: ``y = (x - mean) * scale + beta``.

    ``forward(x, weight, bias, running_mean, running_var, eps) -> y``. The statistics are
    constants (no gradient, as in torch). The backward is the derivative of an affine map and
    is written out of differentiable ops, so it also supports double backward.
    """

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
        cdtype = _compute_dtype(x.dtype)
        ndim = x.dim()
        fmt = _output_memory_format(x)
        invstd = torch.rsqrt(running_var.to(cdtype) + eps)
        scale = _per_channel(invstd if weight is None else weight.to(cdtype) * invstd, ndim)
        mean = _per_channel(running_mean.to(cdtype), ndim)
        # (x - running_mean) * scale + beta rather than the folded x * scale + offset: the
        # subtraction is exact for x near the mean, the folded form loses ulp(mean * scale)
        # when |running_mean| >> std. Mixed half/float operands promote to float32.
        if torch.compiler.is_compiling():
            y = ((x.to(cdtype) - mean) * scale).contiguous(memory_format=fmt)
        else:
            y = torch.sub(x, mean, out=_empty(x, cdtype, fmt)).mul_(scale)
        if bias is not None:
            y = y.add_(_per_channel(bias.to(cdtype), ndim))
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, weight, running_mean, running_var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        fmt = _suggest_memory_format(x)
        cdtype = _compute_dtype(x.dtype)
        ndim = x.dim()
        g = grad_y.contiguous(memory_format=fmt)
        invstd = torch.rsqrt(running_var.to(cdtype) + ctx.eps)
        dx = dw = db = None
        # Plain differentiable ops only: with create_graph=True autograd differentiates this.
        if need_x:
            scale = invstd if weight is None else weight.to(cdtype) * invstd
            dx = (g * _per_channel(scale, ndim)).to(grad_y.dtype).contiguous(memory_format=fmt)
        if need_w:
            xc = x.contiguous(memory_format=fmt) - _per_channel(running_mean.to(cdtype), ndim)
            dw = (_channel_dot(g.to(cdtype), xc) * invstd).to(weight.dtype)
        if need_b:
            db = _channel_sum(g.to(cdtype)).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


# --------------------------------------------------------------------------------------------
# Functional interface (mirrors torch.nn.functional.batch_norm)
# --------------------------------------------------------------------------------------------


def _verify_batch_size(size: torch.Size) -> None:
    size_prods = size[0]
    for s in size[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _check_num_features(name: str, expected: int, tensor: Tensor) -> None:
    if tensor.numel() != expected:
        raise RuntimeError(f"{name} should contain {expected} elements not {tensor.numel()}")


def _check_dtypes(x: Tensor, params: list[Tensor | None]) -> None:
    """The CPU kernel's dtype rules (see aten/src/ATen/native/mixed_type.h)."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise NotImplementedError(
            f"\"batch_norm\" not implemented for '{_cpp_dtype_name(x.dtype)}'"
        )
    defined = [p for p in params if p is not None]
    if not defined:
        return
    if defined[0].dtype != x.dtype:
        # "Mixed" mode: only half/bfloat16 inputs with float32 parameters and buffers.
        if any(p.dtype != torch.float32 for p in defined):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if x.dtype not in _REDUCED_FLOATS:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    for p in defined:
        if p.dtype != x.dtype:
            raise RuntimeError(
                f"expected scalar type {_cpp_dtype_name(x.dtype)} "
                f"but found {_cpp_dtype_name(p.dtype)}"
            )


@torch.no_grad()
def _update_running_stat(buf: Tensor, batch_stat: Tensor, momentum: float) -> None:
    # running = (1 - momentum) * running + momentum * batch, computed in the statistic's
    # (compute) dtype and rounded once into the buffer's dtype.
    buf.copy_(buf.to(batch_stat.dtype) * (1.0 - momentum) + batch_stat * momentum)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Functional batch norm with the semantics of :func:`torch.nn.functional.batch_norm`.

    If ``training`` is true, batch statistics normalize the input and, if given,
    ``running_mean``/``running_var`` are updated in place with factor ``momentum``
    (the variance stored is the unbiased one, :math:`\sigma^2 \cdot n/(n-1)`). Otherwise the
    given running statistics normalize the input.
    """
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")

    if input.numel() == 0:
        # What ATen does for empty inputs: no statistics, no update, but an output that is
        # still connected to weight and bias (their grads come out as zeros, not None).
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out

    num_features = input.shape[1]
    if running_mean is not None:
        _check_num_features("running_mean", num_features, running_mean)
    elif not training:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if running_var is not None:
        _check_num_features("running_var", num_features, running_var)
    elif not training:
        raise RuntimeError("running_var must be defined in evaluation mode")
    if weight is not None:
        _check_num_features("weight", num_features, weight)
    if bias is not None:
        _check_num_features("bias", num_features, bias)
    _check_dtypes(input, [weight, bias, running_mean, running_var])

    if not training:
        assert running_mean is not None and running_var is not None
        return _BatchNormEvalFn.apply(input, weight, bias, running_mean, running_var, eps)

    y, mean, var = _BatchNormTrainFn.apply(input, weight, bias, eps)
    n = input.numel() // num_features
    if running_mean is not None:
        _update_running_stat(running_mean, mean, momentum)
    if running_var is not None:
        # Unbiased (Bessel-corrected) variance for the running estimate; n > 1 is guaranteed
        # by _verify_batch_size.
        _update_running_stat(running_var, var * (n / (n - 1)), momentum)
    return y


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class _BatchNorm(nn.Module):
    """Shared base of the from-scratch batch-norm layers (state and options as in torch)."""

    _version = 2
    __constants__: ClassVar[list[str]] = [
        "track_running_stats",
        "momentum",
        "eps",
        "num_features",
        "affine",
    ]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if self.affine:
            self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.running_mean: Tensor | None
            self.running_var: Tensor | None
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.num_batches_tracked: Tensor | None
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset the running statistics, set :math:`\\gamma = 1` and :math:`\\beta = 0`."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            # Version 2 added the num_batches_tracked buffer; checkpoints written before it
            # load with the current counter (or 0), so strict loading still succeeds.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)

        # As in torch: the factor is momentum, or 1/num_batches_tracked (cumulative moving
        # average) when momentum is None. The counter advances on every training step that
        # tracks statistics, before any check on the batch itself.
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum

        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum

        # Batch statistics in training mode, and in eval mode when there are no buffers.
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        # Buffers are passed only if they are to be updated (training and tracked) or used
        # for normalization (eval mode).
        use_buffers = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )


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
    In eval mode the running estimates normalize the input, making the layer the per-channel
    affine map :math:`y = x \cdot \gamma / \sqrt{\text{running\_var} + \epsilon} + (\beta -
    \text{running\_mean} \cdot \gamma / \sqrt{\text{running\_var} + \epsilon})`.

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
