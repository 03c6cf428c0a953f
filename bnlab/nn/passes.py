"""How the eager fast paths walk memory: the ``(sample, channel)`` row view, the cache-sized
slices of samples, and the layout-aware passes they are made of, shared by batch norm's fast
path (:mod:`bnlab.nn.batchnorm_fast`) and the row engine of group norm and Ghost BN
(:mod:`bnlab.nn.groupnorm`).

A full-size pass over a large activation goes through main memory; walking the tensor a slice
of samples at a time keeps the slice (and the temporaries made from it) in the L2/L3 cache
between the passes over it, so that e.g. a product is summed, or a slice read again, before it
is evicted. On the CPU every ATen op is one pass over its operands, in cache or not, so the
fast paths are written to make few of them: :func:`squared_deviations` fuses a subtraction
and a square, :func:`scale_shift` a per-channel scale and shift where the layout allows it.
``docs/benchmarks.md`` has what each buys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bnlab.nn.functional import reduce_dims

__all__ = ["channel_sum", "rows", "sample_slices", "scale_shift", "squared_deviations"]

# About this many bytes of input per slice of samples. Below _MIN_SLICES slices the tensor is
# processed whole, where the per-slice op overhead would outweigh the saved memory traffic.
_SLICE_BYTES = 2 * 2**20
_MIN_SLICES = 4

# Below this many values per (sample, channel) row, summing the rows first gains nothing over
# one reduction over the strided dims.
_MIN_ROW = 16


def rows(x: Tensor) -> Tensor:
    """``x`` of shape ``(N, C, *)`` as ``(N, C, L)`` rows: a view for NCHW and channels_last
    inputs (the spatial dims merge), a copy otherwise."""
    length = 1
    for s in x.shape[2:]:
        length *= s
    return x.reshape(x.shape[0], x.shape[1], length)


def sample_slices(t: Tensor, align: int = 1) -> list[slice]:
    """Slices of dim 0 of about ``_SLICE_BYTES`` each, each a multiple of ``align`` samples
    (the samples a pass must see together, e.g. a Ghost BN chunk); one slice for all of ``t``
    when it is small or not on the CPU (a GPU gains nothing from cache-sized pieces, only more
    kernel launches). The fast paths write slices through ``out=``, which they may: they run
    with grad mode off (inside a Function's forward, or a first-order backward)."""
    n = t.shape[0]
    per_sample = max(1, t[0].numel() * t.element_size()) if n else 1
    step = max(align, _SLICE_BYTES // per_sample // align * align)
    if n < _MIN_SLICES * step or t.device.type != "cpu":
        return [slice(None)]
    return [slice(i, i + step) for i in range(0, n, step)]


def _contiguous_rows(t: Tensor) -> Tensor | None:
    """View a standard-contiguous (N, C, *) tensor as (N*C, L) rows, if that is worthwhile."""
    if t.dim() < 3 or not t.is_contiguous():
        return None
    n_rows = t.shape[0] * t.shape[1]
    if n_rows == 0 or t.numel() // n_rows < _MIN_ROW:
        return None
    return t.view(n_rows, -1)


def channel_sum(t: Tensor, dtype: torch.dtype | None = None, out: Tensor | None = None
                ) -> Tensor:
    """Sum over every dim except 1, accumulated and returned in ``dtype`` (default t's), into
    ``out`` if given."""
    row_view = _contiguous_rows(t)
    if row_view is not None:
        # Summing the contiguous rows first and then over N is a cheaper reduction on CPU
        # than one reduction over the strided dims (0, 2, 3, ...).
        return torch.sum(row_view.sum(1, dtype=dtype).view(t.shape[0], t.shape[1]), 0, out=out)
    return torch.sum(t, reduce_dims(t), dtype=dtype, out=out)


def squared_deviations(x: Tensor, center: Tensor) -> Tensor:
    """``(x - center)**2`` for a ``center`` that broadcasts against ``x`` (the result in the
    promoted dtype and ``x``'s layout), in one pass: ATen's squared-error kernel
    (``mse_loss`` without reduction) fuses the subtraction and the square, which two ops
    would make two passes."""
    return F.mse_loss(x, center.expand_as(x), reduction="none")


def scale_shift(t: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``out = t * scale + shift`` with ``scale`` and ``shift`` broadcast along dim 1's
    neighbours (per channel, or per (sample, channel) row).

    When ``out`` has channels innermost (NHWC) one ``addcmul`` pass does it: the broadcast
    vectors line up with the vector lanes. In NCHW both vectors are constant along the inner
    loop, which the CPU kernel does not vectorize, so two passes are faster there.
    """
    if out.stride(1) == 1:
        return torch.addcmul(shift, t, scale, out=out)
    return torch.mul(t, scale, out=out).add_(shift)
