r"""Decorrelated batch norm: group-wise ZCA whitening (DBN) and its Newton iteration (IterNorm).

Batch norm standardizes each channel but leaves channels correlated; *whitening* also
decorrelates them. Decorrelated Batch Normalization (Huang, Yang, Lang, Deng, CVPR 2018) whitens
groups of channels with ZCA; Iterative Normalization (Huang, Zhou, Zhu, Liu, Shao, CVPR 2019)
replaces the eigendecomposition by Newton's iteration for :math:`\Sigma^{-1/2}`.

The :math:`C` channels are split into consecutive groups of ``group_size`` (the last one may be
smaller). Per group, with the centred data :math:`X_c` (the group's channels × the
:math:`m = N \cdot H \cdot W` values):

.. math::

    \mu = \tfrac1m X \mathbf 1, \qquad
    \Sigma = \tfrac1m X_c X_c^\top + \epsilon I, \qquad
    \hat X = W X_c, \qquad y = \gamma \odot \hat X + \beta

* ``whitening="zca"`` (DBN): :math:`W = \Sigma^{-1/2} = U \Lambda^{-1/2} U^\top` from the
  eigendecomposition :math:`\Sigma = U \Lambda U^\top`.
* ``whitening="iter"`` (IterNorm): :math:`\Sigma_N = \Sigma / \operatorname{tr}\Sigma`,
  :math:`P_0 = I`, :math:`P_k = \tfrac12 (3 P_{k-1} - P_{k-1}^3 \Sigma_N)` for ``iterations``
  steps, :math:`W = P_T / \sqrt{\operatorname{tr}\Sigma}`. It converges to
  :math:`\Sigma^{-1/2}` (the trace puts the spectrum into (0, 1]); few steps whiten only
  partially, which the paper found to generalize better. Computed in a coupled form that is
  numerically stable (:func:`newton_inv_sqrt`).

Eval mode uses moving averages of :math:`\mu` and of :math:`W` (not of :math:`\Sigma`), as
both papers do: :math:`y = \gamma \odot (W_\text{run} (x - \mu_\text{run})) + \beta` at every
position, a 1×1-convolution-like matmul with the block-diagonal ``running_whitening``.

Numerics: the covariances are accumulated in float64 (:class:`~bnlab.nn.whitening.Gram`) and
the whitening math on the small :math:`g \times g` matrices runs in float64; the other
per-element work (centring, :math:`W X_c`, the backward) runs in the compute dtype (float32 for
half inputs). ZCA's backward is :class:`~bnlab.nn.whitening.InvSqrtSym`'s, finite for equal
eigenvalues; IterNorm is plain matmuls, differentiated by autograd (:mod:`bnlab.nn.whitening`
has the why of each). Layout: channels-first data batches the full groups as per-sample
:math:`(g, L)` matrices; channels-last and (N, C) data use each group's strided :math:`(m, g)`
rows, which avoids transposing copies. The output keeps the input's layout.

The layer reports its statistics through :mod:`bnlab.nn.stats`: the batch mean and whitening
matrix :math:`W_B`, the running ones, and a population covariance turned into :math:`W`
(:meth:`~_DecorrelatedBatchNorm.whitening_from_covariance`, Precise BN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from bnlab.nn.functional import affine, compute_dtype, per_channel
from bnlab.nn.state import Input1d, Input2d, register_affine
from bnlab.nn.stats import NormStatistics
from bnlab.nn.whitening import (
    Center,
    Gram,
    GroupedRows,
    GroupGram,
    InvSqrtSym,
    left_matmul,
    newton_inv_sqrt,
)

__all__ = ["DecorrelatedBatchNorm1d", "DecorrelatedBatchNorm2d"]

WHITENINGS = ("zca", "iter")


def _dense(x: Tensor) -> bool:
    """Whether the channels of ``x`` (N, C, *) are its fastest dimension ((N, C) and
    channels_last input): then all m positions of a group form one strided (g, m) matrix."""
    return x.stride(1) == 1


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _DecorrelatedBatchNorm(nn.Module):
    """Shared state and math of :class:`DecorrelatedBatchNorm1d` / ``2d`` (they differ only in
    the accepted input dimensions)."""

    def __init__(
        self,
        num_features: int,
        group_size: int = 16,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        whitening: str = "zca",
        iterations: int = 5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_positive_int("group_size", group_size)
        _check_positive_int("iterations", iterations)
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
        if not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.group_size = group_size
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.whitening = whitening
        self.iterations = iterations
        # Group layout as (number of groups, size) runs: the full groups are batched as one
        # (G, g, g) problem and the smaller last group, if any, as a second (1, r, r) one.
        size = min(group_size, num_features)
        full, rest = divmod(num_features, size)
        self._runs = [(full, size)] + ([(1, rest)] if rest else [])
        register_affine(self, num_features, affine, True, factory_kwargs)
        self.running_mean: Tensor
        self.running_whitening: Tensor
        self.num_batches_tracked: Tensor
        self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
        self.register_buffer("running_whitening", torch.eye(num_features, **factory_kwargs))
        self.register_buffer(
            "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_mean`` = 0, ``running_whitening`` = I, ``num_batches_tracked`` = 0."""
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(self.num_features))
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, set γ = 1 and β = 0."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, group_size={self.group_size}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, whitening={self.whitening!r}, "
            f"iterations={self.iterations}"
        )

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input size {input.shape}")

    # -- group structure -------------------------------------------------------------------

    def _split(self, t: Tensor, dim: int) -> list[Tensor]:
        """Cut ``dim`` (of size C) of ``t`` into the group runs, each unflattened to (k, s)."""
        parts = t.split([k * s for k, s in self._runs], dim)
        return [p.unflatten(dim, run) for p, run in zip(parts, self._runs, strict=True)]

    def _group_matrices(self, xc: Tensor) -> tuple[bool, list[Tensor]]:
        """``(dense, parts)``: the centred (N, C, *) values as (B, k, s, L) views. Channels-first:
        B = N samples, one part per run. Dense (:func:`_dense`): B = 1 with all m positions,
        one strided part per group (batching groups would need a transposing copy), split from
        the (m, C) rows so that the gradients are concatenated back in that layout."""
        dense = _dense(xc)
        if dense:
            runs = [(1, s) for k, s in self._runs for _ in range(k)]
            xv = xc.movedim(1, -1).reshape(-1, self.num_features)
        else:
            runs, xv = self._runs, xc.reshape(xc.shape[0], self.num_features, -1)
        # No split for a single part: split's backward would copy the whole gradient (a cat).
        parts = xv.split([k * s for k, s in runs], -1 if dense else 1) if len(runs) > 1 else [xv]
        if dense:
            return dense, [p.mT[None, None] for p in parts]
        return dense, [p.unflatten(1, run) for p, run in zip(parts, runs, strict=True)]

    def _one_run_of_rows(self, x: Tensor) -> bool:
        """Dense data (:func:`_dense`) whose groups are all of one size: then the groups are
        column groups of one (m, C) matrix, computed together (:class:`GroupedRows`)."""
        return _dense(x) and len(self._runs) == 1

    def _row_matrix(self, x: Tensor) -> Tensor:
        """Dense (N, C, *) data as its contiguous (m, C) rows (a view for channels_last)."""
        return x.movedim(1, -1).reshape(-1, self.num_features)

    @staticmethod
    def _assemble(ys: list[Tensor], like: Tensor, dense: bool) -> Tensor:
        """Inverse of :meth:`_group_matrices`: the parts back in ``like``'s shape and layout."""
        if dense:
            rows = [y.reshape(y.shape[-2:]).mT for y in ys]
            rows_all = torch.cat(rows, -1) if len(rows) > 1 else rows[0]
            return rows_all.reshape(like.movedim(1, -1).shape).movedim(-1, 1)
        flat = [y.flatten(1, 2) for y in ys]
        return (torch.cat(flat, 1) if len(flat) > 1 else flat[0]).reshape(like.shape)

    def _diagonal_blocks(self, mat: Tensor) -> list[Tensor]:
        """The diagonal (k, s, s) blocks of a (C, C) matrix, one tensor per run."""
        rows = self._split(mat, 0)  # (k, s, C) each
        blocks, start = [], 0
        for (k, s), r in zip(self._runs, rows, strict=True):
            cols = r[..., start : start + k * s].unflatten(-1, (k, s))  # (k, s, k, s)
            blocks.append(cols.diagonal(dim1=0, dim2=2).permute(2, 0, 1))
            start += k * s
        return blocks

    @staticmethod
    def _block_diag(blocks: list[Tensor]) -> Tensor:
        return torch.block_diag(*(b for run in blocks for b in run.unbind(0)))

    # -- whitening math --------------------------------------------------------------------

    def _whiten(self, cov: Tensor) -> Tensor:
        """W for a (k, s, s) float64 batch of covariances, with Σ = cov + eps I."""
        sigma = cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        if self.whitening == "zca":
            return InvSqrtSym.apply(sigma)
        return newton_inv_sqrt(sigma, self.iterations)

    def whitening_from_covariance(self, cov: Tensor) -> Tensor:
        r"""The block-diagonal (C, C) whitening matrix :math:`W` for a (C, C) covariance.

        Only the diagonal group blocks of ``cov`` are read; ``eps`` is added to them as in
        training, and :math:`W` is computed in float64 by the layer's method (ZCA or IterNorm),
        returned in ``cov``'s compute dtype. Used to set ``running_whitening`` from population
        statistics (Precise BN)."""
        if cov.shape != self.running_whitening.shape:
            c = self.num_features
            raise ValueError(f"expected a ({c}, {c}) covariance, got {tuple(cov.shape)}")
        blocks = [self._whiten(b.double()) for b in self._diagonal_blocks(cov)]
        return self._block_diag(blocks).to(compute_dtype(cov.dtype))

    def _batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(mean (C,), centred (N, C, L) values, float64 W blocks)`` of a batch ``x`` in the
        compute dtype."""
        m = x.numel() // x.shape[1]
        if m <= 1:
            msg = "Expected more than 1 value per channel when training, got input size"
            raise ValueError(f"{msg} {tuple(x.shape)}")
        xc, mean = Center.apply(x)
        if self._one_run_of_rows(xc):
            k = self._runs[0][0]
            return mean, xc, [self._whiten(GroupGram.apply(self._row_matrix(xc), k) / m)]
        dense, parts = self._group_matrices(xc)
        grams = [Gram.apply(xs).sum(0) for xs in parts]
        if dense:  # one (1, s, s) Gram per group: batch them per run for the whitening
            it = iter(grams)
            grams = [torch.cat([next(it) for _ in range(k)]) for k, _ in self._runs]
        return mean, xc, [self._whiten(g / m) for g in grams]

    def _whitened(self, xc: Tensor, blocks: list[Tensor]) -> Tensor:
        """``diag(γ) W x_c`` at every position of the centred ``xc``, in ``xc``'s layout. γ is
        folded into W's rows, which saves an elementwise pass forward and two backward."""
        mats = [w.to(xc.dtype) for w in blocks]
        if self.weight is not None:
            gammas = self._split(self.weight.to(xc.dtype), 0)
            mats = [w * g[..., None] for w, g in zip(mats, gammas, strict=True)]
        if self._one_run_of_rows(xc):
            rows_shape = xc.movedim(1, -1).shape
            return GroupedRows.apply(self._row_matrix(xc), mats[0]).view(rows_shape).movedim(-1, 1)
        dense, parts = self._group_matrices(xc)
        if dense:  # one matrix per group
            mats = [w for run in mats for w in run.split(1)]
        ys = [left_matmul(a, xs) for a, xs in zip(mats, parts, strict=True)]
        return self._assemble(ys, xc, dense)

    def batch_whitening(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean (C,), W (C, C))``: the statistics a training-mode forward would use for ``x``
        (W block-diagonal, in the compute dtype). Buffers are left alone; differentiable."""
        self._check_input(x)
        with _no_autocast(x):
            mean, _, blocks = self._batch_statistics(x.to(compute_dtype(x.dtype)))
            return mean, self._block_diag(blocks).to(mean.dtype)

    # -- the statistics interface (bnlab.nn.stats.BatchStatistics) -------------------------

    def batch_statistics(self, x: Tensor) -> NormStatistics:
        """The batch mean and whitening matrix :math:`W_B` a training forward would use."""
        mean, w = self.batch_whitening(x)
        return NormStatistics(mean, whitening=w, eps=self.eps)

    def running_statistics(self) -> NormStatistics:
        """``running_mean`` and ``running_whitening``, which eval normalizes with."""
        return NormStatistics(self.running_mean, whitening=self.running_whitening, eps=self.eps)

    @torch.no_grad()
    def load_population_statistics(self, mean: Tensor, variance: Tensor) -> None:
        """``running_mean`` = ``mean``; ``running_whitening`` = the whitening of ``variance``,
        the (unbiased) population covariance (:meth:`whitening_from_covariance`)."""
        self.running_mean.copy_(mean)
        self.running_whitening.copy_(self.whitening_from_covariance(variance))

    @torch.no_grad()
    def _update_running(self, mean: Tensor, blocks: list[Tensor], factor: float) -> None:
        # (1 - f) * running + f * batch in the statistic's dtype, rounded once into the buffer.
        w = self._block_diag(blocks)
        for buf, batch in ((self.running_mean, mean), (self.running_whitening, w)):
            buf.copy_(buf.to(batch.dtype) * (1.0 - factor) + batch * factor)

    def _momentum_factor(self) -> float:
        """``momentum``, or ``1/num_batches_tracked`` (cumulative average) for None; advances
        the counter on every training call, before any check of the batch (as torch's BN)."""
        if not self.training:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        factor = self._momentum_factor()
        x = input.to(compute_dtype(input.dtype))
        with _no_autocast(x):
            if self.training:
                mean, xc, blocks = self._batch_statistics(x)
                self._update_running(mean, blocks, factor)
            else:
                xc = x - per_channel(self.running_mean.to(x.dtype), x.dim())
                blocks = self._diagonal_blocks(self.running_whitening)
            return affine(self._whitened(xc, blocks), None, self.bias).to(input.dtype)


def _no_autocast(x: Tensor) -> torch.autocast:
    """Autocast off: it would run the group matmuls in half precision, where this layer (like
    torch's norm layers) computes in float32 and float64."""
    return torch.autocast(x.device.type, enabled=False)


class DecorrelatedBatchNorm1d(Input1d, _DecorrelatedBatchNorm):
    r"""Decorrelated batch norm (group-wise ZCA, DBN) or IterNorm over (N, C) or (N, C, L) input.

    See :mod:`bnlab.nn.decorrelated` for the formulas.

    Args:
        num_features: number of channels :math:`C`.
        group_size: channels whitened together; consecutive groups, the last may be smaller
            (clamped to :math:`C`). Default: 16
        eps: added to the diagonal of each group's covariance. Default: 1e-5
        momentum: factor of the moving averages, ``running = (1 - momentum) * running +
            momentum * batch``; None for the cumulative average over ``num_batches_tracked``
            batches. Default: 0.1
        affine: learnable per-channel γ (``weight``, init 1) and β (``bias``, init 0).
        whitening: ``"zca"`` (eigendecomposition) or ``"iter"`` (IterNorm's Newton iteration).
        iterations: Newton steps :math:`T` for ``"iter"``. Default: 5

    Buffers: ``running_mean`` (C,), ``running_whitening`` (C, C), block-diagonal (zero outside
    the groups, identity at init), ``num_batches_tracked``. Eval computes
    ``running_whitening @ (x - running_mean)`` at every position (reading only the group
    blocks), then the affine.

    Methods: :meth:`batch_whitening` (the batch mean and W a training forward would use) and
    :meth:`whitening_from_covariance` (W for a given covariance, e.g. population statistics),
    and the statistics interface of :mod:`bnlab.nn.stats` built on them.

    ``group_size=1`` is batch norm in training mode (same output and gradients; the same
    ``running_mean``). Its ``running_whitening`` is diagonal and holds the running average of
    :math:`1/\sqrt{\sigma_B^2 + \epsilon}` (biased batch variance) where BN's ``running_var``
    averages the unbiased :math:`\sigma_B^2` and eval uses :math:`1/\sqrt{\text{running\_var} +
    \epsilon}`, so the eval outputs differ.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)`; output: same shape.
    """


class DecorrelatedBatchNorm2d(Input2d, _DecorrelatedBatchNorm):
    r"""Decorrelated batch norm (group-wise ZCA, DBN) or IterNorm over (N, C, H, W) input, in
    either memory format (the output keeps a channels_last input's format).

    See :class:`DecorrelatedBatchNorm1d` for the arguments, buffers and methods, and
    :mod:`bnlab.nn.decorrelated` for the formulas.

    Shape:
        - Input: :math:`(N, C, H, W)`; output: same shape.
    """
