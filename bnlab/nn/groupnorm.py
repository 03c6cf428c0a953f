r"""Group normalization written from scratch, and the row engine it shares with Ghost BN.

* :class:`GroupNorm` / :func:`group_norm`: drop-in replacements for torch's (Wu & He, "Group
  Normalization", ECCV 2018). Layer norm, as used in CNNs, is ``GroupNorm(1, C)``.
* :func:`pooled_row_norm`: the engine. View an ``(N, C, *)`` input as ``N * C`` rows of
  :math:`L = \prod *` values, one per (sample, channel). Group norm and Ghost BN both normalize
  each row with statistics *pooled over a group of rows*: group norm pools the channels of one
  group within a sample, Ghost BN (:mod:`bnlab.nn.ghost`) pools one chunk of samples within a
  channel. A ``pool`` callable says which rows belong together; the rest is shared.

The math, for a row ``(n, c)`` of group :math:`G(n, c)` (:math:`M` values in all)::

    mu      = 1/M sum_G x                   var = 1/M sum_G (x - mu)^2      (biased)
    rstd    = 1 / sqrt(var + eps)
    y       = (x - mu) * rstd * gamma_c + beta_c

    d beta_c  = sum_n sum_l g               d gamma_c = sum_n rstd * sum_l g (x - mu)
    d x       = rstd * (gamma_c g - A - (x - mu) * rstd * B),
                A = 1/M sum_G gamma g,      B = 1/M sum_G gamma g (x - mu) * rstd

Two implementations compute it. :func:`_reference` is plain differentiable tensor ops; autograd
differentiates it, ``torch.compile`` traces it, and a backward with ``create_graph=True``
differentiates it again. :class:`_PooledRowNormFn` is the eager fast path: the backward above,
written out, and both passes walk the rows a slice of samples at a time
(:func:`bnlab.nn.passes.sample_slices`), so that each slice is centred, squared, summed and
scaled while it is still in the CPU cache (slices always hold whole groups). Eager calls with
``fast=True`` (the layers' default) take it, the others the reference. No native
normalization kernel is called anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn import init

from bnlab.nn.compat import output_memory_format
from bnlab.nn.functional import compute_dtype
from bnlab.nn.passes import rows, sample_slices, scale_shift
from bnlab.nn.state import register_affine

__all__ = ["GroupNorm", "group_norm", "pooled_row_norm"]

Pool = Callable[[Tensor], Tensor]
"""``pool(t)``: for per-row values ``t`` of shape ``(n, C)`` (whole groups of rows), each value
replaced by the mean over its group's rows, as differentiable ops."""

def _reference(
    x3: Tensor, pool: Pool, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The formulas of the module docstring as differentiable ops: ``(y, mean, var)`` with the
    per-row (pooled) ``mean`` and biased ``var`` of shape ``(N, C)`` in the compute dtype."""
    xf = x3.to(compute_dtype(x3.dtype))
    length = x3.shape[2]
    mean = pool(xf.sum(-1)) / length
    xc = xf - mean.unsqueeze(-1)
    var = pool(xc.square().sum(-1)) / length
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    y = xc * scale.unsqueeze(-1)
    if bias is not None:
        y = y + bias.to(y.dtype).unsqueeze(-1)
    return y.to(x3.dtype), mean.detach(), var.detach()


def _row_dot(a: Tensor, b: Tensor, buf: Tensor) -> Tensor:
    """Per-row ``sum(a * b)`` of ``(n, C, L)`` tensors, the product formed in ``buf`` (a sum
    of squares too: ``linalg.vector_norm`` is fast only along contiguous rows, not in NHWC)."""
    return torch.mul(a, b, out=buf[: a.shape[0]]).sum(-1)


def _like_rows(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A new ``(N, C, *)`` tensor in ``x``'s memory format (NCHW or channels_last) and its
    ``(N, C, L)`` rows, a view of it."""
    t = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=output_memory_format(x))
    return t, t.view(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


class _PooledRowNormFn(Function):
    """Eager :func:`pooled_row_norm`: ``forward(x, weight, bias, pool, eps, align) -> (y, mean,
    var)`` for ``x`` of shape ``(N, C, *)``, computed on its ``(N, C, L)`` rows, with the
    hand-derived backward of the module docstring. ``y`` is a tensor of its own, not a view
    (an in-place ReLU on a view of a Function's output makes autograd copy the gradient).
    Saves ``x`` and per-row vectors only; ``mean`` and ``var`` are non-differentiable."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        pool: Pool,
        eps: float,
        align: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        cdtype = compute_dtype(x.dtype)
        x3 = rows(x)
        n, c, length = x3.shape
        y, y3 = _like_rows(x, cdtype)
        mean = x3.new_empty((n, c), dtype=cdtype)
        var, rstd = torch.empty_like(mean), torch.empty_like(mean)
        w = None if weight is None else weight.to(cdtype)
        shift = torch.zeros(c, dtype=cdtype, device=x.device) if bias is None else bias.to(cdtype)
        slices = sample_slices(x3, align)
        buf = torch.empty_like(y3[slices[0]])
        for s in slices:
            m = pool(x3[s].sum(-1, dtype=cdtype)) / length
            xc = torch.sub(x3[s], m.unsqueeze(-1), out=y3[s])
            v = pool(_row_dot(xc, xc, buf)) / length
            r = torch.rsqrt(v + eps)
            mean[s], var[s], rstd[s] = m, v, r
            scale_shift(xc, (r if w is None else r * w).unsqueeze(-1), shift.unsqueeze(-1), out=xc)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.pool, ctx.eps, ctx.align = pool, eps, align
        ctx.mark_non_differentiable(mean, var)
        return y.to(x.dtype), mean, var

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_y: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x3, g3 = rows(x), rows(grad_y)
        if torch.is_grad_enabled():
            # create_graph=True: the grads must themselves be differentiable, so differentiate
            # the reference (recomputed from the saved, graph-connected inputs).
            inputs = [t for t, need in zip((x, weight, bias), (need_x, need_w, need_b),
                                           strict=True) if need]
            y = _reference(x3, ctx.pool, weight, bias, ctx.eps)[0]
            grads = iter(torch.autograd.grad(y, inputs, g3, create_graph=True))
            return (*(next(grads) if need else None for need in (need_x, need_w, need_b)),
                    None, None, None)
        cdtype = mean.dtype
        pool, length = ctx.pool, x3.shape[2]
        w = None if weight is None else weight.to(cdtype)
        dx, dx3 = _like_rows(x, cdtype)
        sum_g, sum_gxc = torch.empty_like(mean), torch.empty_like(mean)
        slices = sample_slices(x3, ctx.align)
        buf = torch.empty_like(dx3[slices[0]])
        for s in slices:
            g, r = g3[s], rstd[s]
            xc = torch.sub(x3[s], mean[s].unsqueeze(-1), out=dx3[s])
            sum_g[s] = g.sum(-1, dtype=cdtype)
            sum_gxc[s] = _row_dot(g, xc, buf)
            wg = sum_g[s] if w is None else w * sum_g[s]
            wgxc = sum_gxc[s] if w is None else w * sum_gxc[s]
            a = pool(wg) / length
            b = pool(wgxc) * r / length
            # dx = rstd * gamma * g - rstd * A - (x - mu) * rstd^2 * B, into xc's buffer.
            scale_shift(xc, (-r * r * b).unsqueeze(-1), (-r * a).unsqueeze(-1), out=xc)
            xc.addcmul_(g, (r if w is None else r * w).unsqueeze(-1))
        return (
            dx.to(grad_y.dtype) if need_x else None,
            (sum_gxc * rstd).sum(0).to(weight.dtype) if need_w else None,
            sum_g.sum(0).to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def pooled_row_norm(
    x: Tensor,
    pool: Pool,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    align: int = 1,
    *,
    fast: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize the ``(sample, channel)`` rows of ``x`` (``(N, C, *)``) with statistics pooled
    by ``pool`` (see :data:`Pool`), then the per-channel affine; ``align``: the number of
    samples whose rows ``pool`` must see together (1 when groups lie within a sample, ``N``
    for no slicing). Returns ``(y, mean, var)``: ``y`` like ``x`` in dtype and memory format
    (NCHW or channels_last), and the per-row pooled mean and biased variance, ``(N, C)``
    tensors in the compute dtype, detached. ``fast``: eager calls take the fast path
    (:class:`_PooledRowNormFn`); under ``torch.compile`` the reference always runs."""
    if fast and not torch.compiler.is_compiling():
        return _PooledRowNormFn.apply(x, weight, bias, pool, eps, align)
    y, mean, var = _reference(rows(x), pool, weight, bias, eps)
    return y.view(x.shape), mean, var


def _group_pool(num_groups: int) -> Pool:
    """The group-norm pool: each (sample, channel) value averaged over its group of channels."""

    def pool(t: Tensor) -> Tensor:
        n, c = t.shape
        groups = t.view(n, num_groups, c // num_groups)
        return groups.mean(-1, keepdim=True).expand_as(groups).reshape(n, c)

    return pool


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    fast: bool = True,
) -> Tensor:
    """Functional group norm with the semantics (and errors) of
    :func:`torch.nn.functional.group_norm`; see :class:`GroupNorm`. ``fast``: eager calls take
    the fast path (as :func:`pooled_row_norm`)."""
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
        )
    n, c = input.shape[:2]
    per_group = [n * c // num_groups, num_groups, *input.shape[2:]]
    values = per_group[0]
    for s in per_group[2:]:
        values *= s
    if values == 1:  # torch's _verify_batch_size, applied to this size
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {per_group}"
        )
    if c % num_groups:
        raise RuntimeError(
            "Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.shape)} and num_groups={num_groups}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != c):
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {list(t.shape)} and input of shape "
                f"{list(input.shape)}"
            )
    return pooled_row_norm(input, _group_pool(num_groups), weight, bias, eps, fast=fast)[0]


class GroupNorm(nn.Module):
    r"""Group Normalization (Wu & He, ECCV 2018), written from scratch.

    Drop-in replacement for :class:`torch.nn.GroupNorm` (same constructor, ``weight`` and
    ``bias`` parameters, errors, ``extra_repr`` and state dict). The ``C`` channels are split
    into ``num_groups`` groups of consecutive channels; each sample's group is normalized over
    its :math:`M = C/G \cdot \prod *` values, then the per-channel affine is applied:

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma_c + \beta_c

    with the biased variance. No batch statistics and no running statistics: training and
    eval are the same map. ``GroupNorm(1, C)`` is bnlab's layer norm (each sample over C, H,
    W, as layer norm is used in CNNs; unlike :class:`torch.nn.LayerNorm` its affine is per
    channel). ``GroupNorm(C, C)`` is instance norm with an affine.

    Forward and backward are written out in :mod:`bnlab.nn.groupnorm` (no native kernel).
    Half-precision inputs are computed in float32 and returned in their dtype; NCHW and
    channels_last inputs give outputs and input gradients in their own memory format.

    Args:
        num_groups: number of groups to separate the channels into
        num_channels: number of channels :math:`C` expected in the input
        eps: a value added to the denominator for numerical stability. Default: 1e-5
        affine: learnable per-channel ``weight`` (ones) and ``bias`` (zeros). Default: True
        device, dtype: factory arguments for the parameters.
        bias: (keyword-only) if ``False``, no additive bias. Default: ``True``
        fast: (keyword-only) eager calls take the fast path; ``False``: the reference code
            (a plain attribute, not in the state dict). Default: ``True``

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: same shape as input

    Examples::

        >>> m = GroupNorm(3, 6)
        >>> output = m(torch.randn(20, 6, 10, 10))
    """

    __constants__: ClassVar[list[str]] = ["num_groups", "num_channels", "eps", "affine"]
    num_groups: int
    num_channels: int
    eps: float
    affine: bool
    fast: bool

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        fast: bool = True,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.fast = fast
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        register_affine(self, num_channels, affine, bias, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set :math:`\\gamma = 1` and :math:`\\beta = 0`."""
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        # self.fast: the eager fast path (_PooledRowNormFn), else the reference (_reference).
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                          fast=self.fast)

    def extra_repr(self) -> str:
        return (
            "{num_groups}, {num_channels}, eps={eps}, affine={affine}, "
            "bias={use_bias}".format(**self.__dict__, use_bias=self.bias is not None)
        )
