"""How the eager fast paths walk memory: the ``(sample, channel)`` row view and the cache-sized
slices of samples, shared by batch norm's fast path (:mod:`bnlab.nn.batchnorm_fast`) and the
row engine of group norm and Ghost BN (:mod:`bnlab.nn.groupnorm`).

A full-size pass over a large activation goes through main memory; walking the tensor a slice
of samples at a time keeps the slice (and the temporaries made from it) in the L2/L3 cache
between the passes over it, so that e.g. a product is summed, or a slice read again, before it
is evicted. ``docs/benchmarks.md`` has what this buys.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["rows", "sample_slices"]

# About this many bytes of input per slice of samples. Below _MIN_SLICES slices the tensor is
# processed whole, where the per-slice op overhead would outweigh the saved memory traffic.
_SLICE_BYTES = 2 * 2**20
_MIN_SLICES = 4


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
