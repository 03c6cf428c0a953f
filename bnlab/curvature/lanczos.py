r"""Lanczos tridiagonalization with full reorthogonalization, on any symmetric ``matvec``.

From a unit start vector :math:`q_1`, step :math:`j` computes :math:`w = A q_j - \beta_{j-1}
q_{j-1}`, :math:`\alpha_j = q_j^\top A q_j`, :math:`w \mathrel{-}= \alpha_j q_j`, then
re-orthogonalizes :math:`w` against *every* earlier :math:`q_i` by classical Gram–Schmidt, a
second time when the first pass removed more than :math:`1 - 1/\sqrt2` of its norm (the
criterion of Daniel, Gragg, Kaufman & Stewart 1976), and sets :math:`\beta_j = \|w\|`,
:math:`q_{j+1} = w / \beta_j`. Without the reorthogonalization the :math:`q_i` lose
orthogonality in floating point as soon as a Ritz value converges, and converged eigenvalues
come back as spurious copies ("ghosts"); with it, the basis stays orthonormal to rounding, at
the cost of keeping it (``steps × n`` values) and two products with it per step.

After :math:`m` steps, :math:`Q_m^\top A Q_m = T_m`, the tridiagonal matrix of the
:math:`\alpha, \beta`. Its eigenpairs :math:`(\theta_i, s_i)` give

- Ritz values :math:`\theta_i` and vectors :math:`Q_m s_i`, with residual
  :math:`\|A y_i - \theta_i y_i\| = \beta_m |s_{m,i}|`, which bounds the distance from
  :math:`\theta_i` to the nearest eigenvalue of :math:`A` (Golub & Van Loan, Sec. 10.1);
- the Gauss quadrature of :math:`q_1^\top f(A) q_1 = \sum_i s_{1,i}^2 f(\theta_i)`, exact for
  polynomials of degree < :math:`2m` (Golub & Meurant 1994), the basis of stochastic Lanczos
  quadrature.

*Breakdown*: :math:`\beta_j \approx 0` means :math:`q_1`'s Krylov space is invariant; its Ritz
values are then exact eigenvalues (each distinct eigenvalue with a component in :math:`q_1`,
once). In floating point :math:`\beta_j` only gets small, so :math:`\beta_j \le
\sqrt{\epsilon}\,\|A\|` counts as a breakdown: setting it to 0 moves no eigenvalue of
:math:`T` by more than :math:`\beta_j`, and the residuals below include it. For quadrature
that is the end. For eigenvalues, given a generator, the iteration restarts from a random
vector orthogonal to the basis (a new diagonal block of :math:`T`), which finds repeated
eigenvalues and those :math:`q_1` missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class Lanczos:
    """The Lanczos iteration for ``matvec`` from ``start``, step by step (see the module
    docstring). At most ``max_steps`` steps (and never more than the dimension); with
    ``generator`` it restarts after a breakdown, else it stops there."""

    def __init__(self, matvec: MatVec, start: Tensor, max_steps: int,
                 generator: torch.Generator | None = None) -> None:
        self.matvec, self.generator = matvec, generator
        n = start.numel()
        self.max_steps = min(max_steps, n)
        self.basis = start.new_empty(self.max_steps, n)
        norm = torch.linalg.vector_norm(start)
        if not norm > 0:
            raise ValueError("the Lanczos start vector is zero")
        self.basis[0] = start / norm
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}; 0 at a breakdown
        self.dropped: list[tuple[int, float]] = []  # (j, beta_j) set to 0 at breakdowns
        self.block_start = 0  # first index of the current diagonal block of T
        self.anorm = 0.0  # the largest ||A q_j|| seen: a lower bound on ||A||
        self.done = False

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def step(self) -> None:
        """One step: alpha_j, beta_j and (unless it was the last) q_{j+1}."""
        if self.done:
            raise RuntimeError("the Lanczos iteration has ended")
        j = self.steps
        q = self.basis[j]
        w = self.matvec(q)
        self.anorm = max(self.anorm, float(torch.linalg.vector_norm(w)))
        alpha = float(torch.dot(q, w))
        w = w - alpha * q
        if j > self.block_start:
            w = w - self.beta[j - 1] * self.basis[j - 1]
        w = self._orthogonalize(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        self.alpha.append(alpha)
        self.beta.append(beta)  # after the last step: the residual norm, for the bounds
        if j + 1 == self.max_steps:
            self.done = True
            return
        if beta > math.sqrt(torch.finfo(w.dtype).eps) * self.anorm:
            self.basis[j + 1] = w / beta
            return
        self.beta[-1] = 0.0  # an invariant subspace: T splits here
        self.dropped.append((j, beta))
        if self.generator is None:
            self.done = True
            return
        self.basis[j + 1] = self._random_orthogonal(j + 1)
        self.block_start = j + 1

    def run(self, steps: int) -> Lanczos:
        """Step until ``steps`` steps are done or the iteration ends."""
        while not self.done and self.steps < steps:
            self.step()
        return self

    def _orthogonalize(self, w: Tensor, count: int) -> Tensor:
        """``w`` minus its projection on the first ``count`` basis vectors (CGS, twice when
        the first pass cancelled much of ``w``)."""
        q = self.basis[:count]
        before = torch.linalg.vector_norm(w)
        w = w - q.T @ (q @ w)
        if torch.linalg.vector_norm(w) < before / math.sqrt(2):
            w = w - q.T @ (q @ w)
        return w

    def _random_orthogonal(self, count: int) -> Tensor:
        """A random unit vector orthogonal to the first ``count`` basis vectors."""
        n = self.basis.shape[1]
        w = torch.randn(n, generator=self.generator, dtype=self.basis.dtype,
                        device=self.basis.device)
        for _ in range(2):
            q = self.basis[:count]
            w = w - q.T @ (q @ w)
        return w / torch.linalg.vector_norm(w)

    def tridiagonal(self) -> Tensor:
        """T of the steps done, float64, on the CPU."""
        m = self.steps
        t = torch.diag(torch.tensor(self.alpha, dtype=torch.float64))
        off = torch.tensor(self.beta[: m - 1], dtype=torch.float64)
        return t + torch.diag(off, 1) + torch.diag(off, -1)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(theta, s, residual)``: the Ritz values in ascending order, the eigenvectors of
        T as columns, and a bound on each Ritz pair's residual norm: ``beta_m |s_{m,i}|``
        plus ``beta_j |s_{j,i}|`` for each coupling dropped at a breakdown (float64)."""
        theta, s = torch.linalg.eigh(self.tridiagonal())
        residual = abs(self.beta[-1]) * s[-1].abs()
        for j, beta in self.dropped:
            residual = residual + beta * s[j].abs()
        return theta, s, residual

    def ritz_vectors(self, s: Tensor) -> Tensor:
        """The Ritz vectors ``Q_m s_i`` for the columns of ``s``, as rows, in the basis'
        dtype."""
        m = self.steps
        return s.T.to(self.basis) @ self.basis[:m]


def quadrature(lanczos: Lanczos) -> tuple[Tensor, Tensor]:
    """``(nodes, weights)`` of the Gauss quadrature of ``q_1ᵀ f(A) q_1`` (float64; the weights
    are the squared first components of T's eigenvectors and sum to 1)."""
    theta, s = torch.linalg.eigh(lanczos.tridiagonal())
    return theta, s[0].square()


def rademacher(n: int, generator: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """``n`` independent signs, ±1 with probability 1/2 each."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def broaden(nodes: list[Tensor], weights: list[Tensor], points: int, width: float
            ) -> tuple[Tensor, Tensor, float]:
    r"""``(grid, density, sigma)``: the mean over runs of :math:`\sum_i w_i\,
    \mathcal N(t; \theta_i, \sigma^2)`, each quadrature node a Gaussian of its weight.
    ``sigma = width × (largest node − smallest node)`` over all runs (× the largest \|node\|
    when all coincide, × 1 when all are 0). The grid: ``points`` evenly spaced values from
    6σ below the smallest node to 6σ above the largest, so the density integrates to 1 up to
    ~1e-9 of Gaussian tail (not renormalized: its integral is a check, not a given)."""
    all_nodes = torch.cat(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    scale = (hi - lo) or max(abs(lo), abs(hi)) or 1.0
    sigma = width * scale
    grid = torch.linspace(lo - 6 * sigma, hi + 6 * sigma, points, dtype=torch.float64)
    density = torch.zeros_like(grid)
    for theta, w in zip(nodes, weights, strict=True):
        z = (grid[:, None] - theta[None, :]) / sigma
        density += (torch.exp(-0.5 * z.square()) * w[None, :]).sum(1)
    density /= len(nodes) * sigma * math.sqrt(2 * math.pi)
    return grid, density, sigma
