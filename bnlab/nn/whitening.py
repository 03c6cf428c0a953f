r"""The autograd pieces of decorrelated batch norm (:mod:`bnlab.nn.decorrelated`): centring,
the float64 Gram matrix and the two inverse square roots of a covariance.

* :class:`Center`: per-channel centring with a two-pass backward.
* :class:`Gram`: :math:`X X^\top` accumulated in float64. ZCA divides by eigenvalues as small
  as :math:`\epsilon`, where a float32 Gram loses the digits that matter.
* :class:`InvSqrtSym`: :math:`\Sigma^{-1/2}` by ``eigh`` (DBN's ZCA). ``torch.linalg.eigh``'s
  backward has :math:`1/(\lambda_i - \lambda_j)` terms, infinite for equal eigenvalues although
  :math:`\Sigma^{-1/2}` is smooth there; this Function differentiates the matrix function
  directly instead (once: no double backward through ZCA).
* :func:`newton_inv_sqrt`: IterNorm's Newton iteration, plain matmuls differentiated by
  autograd, in a numerically stable coupled form.
* :func:`left_matmul`, :func:`rows_fastest`: products laid out like channels-last data, so
  neither operand needs a transposing copy.
* :class:`GroupedRows`, :class:`GroupGram`: the same products for all column groups of an
  ``(m, G*g)`` channels-last matrix at once, one batched matmul over strided views that writes
  its result in that layout (no per-group copies, no concatenation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bnlab.nn.functional import per_channel, reduce_dims

__all__ = [
    "Center",
    "Gram",
    "GroupGram",
    "GroupedRows",
    "InvSqrtSym",
    "column_groups",
    "left_matmul",
    "newton_inv_sqrt",
    "rows_fastest",
]


class Center(torch.autograd.Function):
    """``(x - mean, mean)`` per channel of a (N, C, *) tensor. Backward: ``g - mean(g)`` (plus
    the mean's gradient / m), two passes where autograd's ``x - x.mean()`` takes five;
    differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        mean = x.mean(reduce_dims(x))
        return x - per_channel(mean, x.dim()), mean

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_mean: Tensor | None) -> Tensor:  # type: ignore[override]
        shift = grad.mean(reduce_dims(grad))
        if grad_mean is not None:
            shift = shift - grad_mean * (grad.shape[1] / grad.numel())
        return grad - per_channel(shift, grad.dim())


class Gram(torch.autograd.Function):
    """``X X^T`` in float64 for a batch ``xs`` (..., s, L) of matrices; the float64 copy of
    ``xs`` lives only inside the forward. Backward ``(G + G^T) X`` in ``xs``'s dtype: one
    batched matmul where autograd would run one per operand and add them."""

    @staticmethod
    def forward(ctx: Any, xs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xs)
        xd = xs.mT.double().mT if rows_fastest(xs) else xs.double()  # keeps xs's layout
        return xd @ xd.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (xs,) = ctx.saved_tensors
        return left_matmul((grad + grad.mT).to(xs.dtype), xs)


def left_matmul(a: Tensor, x: Tensor) -> Tensor:
    """``a @ x`` laid out like ``x``: as ``(x^T a^T)^T`` when x's rows are its fastest dimension
    (channels-last data), so neither x nor the result needs a transposing copy."""
    return (x.mT @ a.mT).mT if rows_fastest(x) else a @ x


def rows_fastest(x: Tensor) -> bool:
    """Whether the rows of the matrices in ``x`` (..., s, L) are its fastest dimension."""
    return x.stride(-2) == 1 and x.shape[-1] > 1


def column_groups(x: Tensor, groups: int) -> Tensor:
    """A contiguous ``(m, G*g)`` matrix as a ``(G, m, g)`` view: group ``k`` is columns
    ``k*g`` to ``(k+1)*g - 1``, each group a row-major matrix of leading dimension ``G*g``."""
    return x.view(x.shape[0], groups, -1).transpose(0, 1)


class GroupedRows(torch.autograd.Function):
    """``y[:, group k] = x[:, group k] @ w[k]^T`` for a contiguous ``(m, G*g)`` matrix ``x`` and
    ``w`` of shape ``(G, g, g)``: one batched matmul written into a contiguous ``(m, G*g)``
    result. Backward: this Function again and a batched matmul, so double backward works."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.bmm(column_groups(x, w.shape[0]), w.mT, out=column_groups(y, w.shape[0]))
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        dx = GroupedRows.apply(grad, w.mT) if ctx.needs_input_grad[0] else None
        groups = w.shape[0]
        dw = (column_groups(grad, groups).mT @ column_groups(x, groups)
              if ctx.needs_input_grad[1] else None)
        return dx, dw


class GroupGram(torch.autograd.Function):
    """The ``(G, g, g)`` float64 Gram matrices ``X_k^T X_k`` of the column groups of a
    contiguous ``(m, G*g)`` matrix (:class:`Gram` for channels-last data, all groups at once);
    backward ``X_k (dG_k + dG_k^T)`` in ``x``'s dtype (:class:`GroupedRows`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        xg = column_groups(x.double(), groups)
        return xg.mT @ xg

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return GroupedRows.apply(x, (grad + grad.mT).to(x.dtype)), None


class InvSqrtSym(torch.autograd.Function):
    r""":math:`\Sigma^{-1/2}` of a batch of symmetric positive definite matrices via ``eigh``.

    Backward: the Daleckii–Krein form of the derivative of :math:`f(\Sigma) = U f(\Lambda)
    U^\top`, :math:`\bar\Sigma = U (K \circ \operatorname{sym}(U^\top \bar W U)) U^\top` with
    :math:`K_{ij} = (f(\lambda_i) - f(\lambda_j)) / (\lambda_i - \lambda_j)`, :math:`K_{ii} =
    f'(\lambda_i)`. For :math:`f = \lambda^{-1/2}` and :math:`s = \sqrt\lambda` this is
    :math:`K_{ij} = -1 / (s_i s_j (s_i + s_j))` (as :math:`\lambda_i - \lambda_j = (s_i -
    s_j)(s_i + s_j)`), also :math:`f'` on the diagonal: no eigenvalue difference in a
    denominator, so it is exact and finite for (nearly) equal eigenvalues, where ``eigh``'s own
    backward divides by zero. Symmetrized: only symmetric perturbations of Σ are meaningful."""

    @staticmethod
    def forward(ctx: Any, sigma: Tensor) -> Tensor:  # type: ignore[override]
        lam, u = torch.linalg.eigh(sigma)
        s = lam.sqrt()
        ctx.save_for_backward(u, s)
        return (u / s.unsqueeze(-2)) @ u.mT

    @staticmethod
    @once_differentiable  # the saved eigenvectors are not differentiable functions of sigma here
    def backward(ctx: Any, grad_w: Tensor) -> Tensor:  # type: ignore[override]
        u, s = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        k = -1.0 / (si * sj * (si + sj))
        g = u.mT @ grad_w @ u
        return u @ (k * (g + g.mT) / 2) @ u.mT


def newton_inv_sqrt(sigma: Tensor, iterations: int) -> Tensor:
    r"""IterNorm's whitening matrix :math:`P_T / \sqrt{\operatorname{tr}\Sigma}` for a batch
    ``(k, s, s)`` of covariance matrices.

    Coupled form: :math:`T_k = \tfrac12 (3I - P_k Y_k)`, :math:`Y_{k+1} = Y_k T_k`,
    :math:`P_{k+1} = T_k P_k`, :math:`Y_0 = \Sigma_N`, :math:`P_0 = I`. In exact arithmetic
    :math:`Y_k = \Sigma_N P_k` (all are polynomials in :math:`\Sigma_N`), so these are the
    paper's iterates :math:`P_{k+1} = \tfrac12 (3 P_k - P_k^3 \Sigma_N)`, at the same cost.
    The paper's uncoupled form is unstable at its fixed point: a rounding error in eigen-component
    (i, j) grows by :math:`|2 - \sqrt r - r|/2`, :math:`r = \lambda_j / \lambda_i`, per step,
    which exceeds 1 once :math:`r > 2.44`, so after converging it diverges unless
    :math:`\Sigma` is nearly isotropic. The coupled form is stable (Higham, *Functions of
    Matrices*, 2008, Sec. 6.7)."""
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    y, p = sigma / trace, eye
    for _ in range(iterations):
        t = torch.baddbmm(eye, p, y, beta=1.5, alpha=-0.5)
        y, p = y @ t, t @ p
    return p / trace.sqrt()
