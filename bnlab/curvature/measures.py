"""The curvature measures, on a :class:`~bnlab.curvature.operator.HessianOperator` (``*_of``
functions: several measures of one batch share one forward and backward) and as one call on a
model (the public functions of :mod:`bnlab.curvature`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bnlab.curvature.lanczos import Lanczos, broaden, quadrature, rademacher
from bnlab.curvature.operator import HessianOperator, LossFn, Params, hessian_operator
from bnlab.errors import UsageError

log = logging.getLogger(__name__)


# The smallest value of each integer setting (2 samples: a standard error needs two) ...
MINIMUM = {"k": 1, "iters": 1, "samples": 2, "runs": 1, "steps": 1, "grid_points": 2}
POSITIVE = ("tol", "broadening")  # ... and the settings that are numbers > 0


def validate_settings(**settings: object) -> None:
    """Raise ``UsageError`` for the first setting (by the names of the functions' arguments)
    outside its range."""
    for name, value in settings.items():
        if name in MINIMUM:
            if isinstance(value, bool) or not isinstance(value, int) or value < MINIMUM[name]:
                raise UsageError(f"{name}={value!r} is invalid; allowed: an integer >= "
                                 f"{MINIMUM[name]}")
        elif name in POSITIVE:
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UsageError(f"{name}={value!r} is invalid; allowed: a number > 0")
        else:
            raise TypeError(f"no such setting: {name}")


def _generator(op: HessianOperator, seed: int) -> torch.Generator:
    return torch.Generator(device=op.device).manual_seed(seed)


@dataclass
class Eigenpairs:
    """The top ``k`` Ritz pairs: ``values`` (k,) float64, descending; ``vectors`` (k, dim) in
    the operator's dtype, orthonormal rows; ``residuals`` (k,) ‖H y − θ y‖; ``steps`` Lanczos
    steps (Hessian-vector products) taken; ``converged``: every residual ≤ tol × the largest
    |Ritz value|."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    steps: int
    converged: bool


def top_eigenpairs_of(op: HessianOperator, k: int = 1, iters: int = 100, tol: float = 1e-3,
                      seed: int = 0) -> Eigenpairs:
    """The ``k`` algebraically largest eigenvalues of H and their eigenvectors, by Lanczos with
    full reorthogonalization (:class:`~bnlab.curvature.lanczos.Lanczos`) from a Gaussian
    start vector, restarted after a breakdown. Stops after ``iters`` steps or, once the current
    Krylov block has ``k`` vectors, as soon as each of the top ``k`` Ritz pairs has a residual
    ≤ ``tol`` × the largest |Ritz value| (then each value is within that residual of an
    eigenvalue of H, and usually much closer: residual² / gap). Like any Krylov method it
    cannot see an eigenvalue whose eigenvector the start vector misses (probability 0) before
    a restart."""
    validate_settings(k=k, iters=iters, tol=tol)
    if k > op.dim:
        raise UsageError(f"k={k} is larger than the number of parameters ({op.dim})")
    if k > iters:
        raise UsageError(f"k={k} needs iters >= k (iters={iters})")
    gen = _generator(op, seed)
    start = torch.randn(op.dim, generator=gen, dtype=op.dtype, device=op.device)
    lanczos = Lanczos(op.matvec, start, iters, generator=gen)
    converged = False
    while not lanczos.done:
        lanczos.step()
        if lanczos.steps - lanczos.block_start < k:
            continue
        theta, _, residual = lanczos.ritz()
        scale = float(theta.abs().max())
        if bool((residual[-k:] <= tol * scale).all()):
            converged = True
            break
    theta, s, residual = lanczos.ritz()
    top = torch.arange(len(theta) - 1, len(theta) - 1 - k, -1)
    values, residuals = theta[top], residual[top]
    converged = converged or bool((residuals <= tol * float(theta.abs().max())).all())
    if not converged:
        log.warning("top_eigenvalues: not converged after %d Lanczos steps (largest residual "
                    "%.3g, tol %.3g x %.3g)", lanczos.steps, float(residuals.max()), tol,
                    float(theta.abs().max()))
    return Eigenpairs(values, lanczos.ritz_vectors(s[:, top]), residuals, lanczos.steps,
                      converged)


def trace_of(op: HessianOperator, samples: int = 100, seed: int = 0) -> tuple[float, float]:
    """Hutchinson's estimate of tr H: the mean of zᵀHz over ``samples`` Rademacher vectors z
    (unbiased; variance 2 Σ_{i≠j} H_ij² per sample, so exact when H is diagonal), and its
    standard error, the sample standard deviation / √samples."""
    validate_settings(samples=samples)
    gen = _generator(op, seed)
    values = []
    for _ in range(samples):
        z = rademacher(op.dim, gen, op.dtype, op.device)
        values.append(torch.dot(z, op.matvec(z)))
    t = torch.stack(values).double()
    return float(t.mean()), float(t.std() / math.sqrt(samples))


def quadrature_of(op: HessianOperator, runs: int = 1, steps: int = 100, seed: int = 0
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Stochastic Lanczos quadrature (Golub & Meurant; Lin, Saad & Yang 2016; Ghorbani et al.
    2019): per run, ``steps`` Lanczos steps (fewer at a breakdown, where the quadrature is
    exact) from v = z/√dim, z Rademacher; the nodes θ_i and weights w_i of the Gauss quadrature
    of vᵀf(H)v. Since E[vᵀf(H)v] = tr f(H)/dim, ``Σ_i w_i δ(t − θ_i)`` averaged over runs
    estimates the spectral density (1/dim) Σ_j δ(t − λ_j), and its first moment × dim is the
    Hutchinson estimate of tr H with the same z (the same draws as :func:`trace_of` with the
    same seed)."""
    validate_settings(runs=runs, steps=steps)
    gen = _generator(op, seed)
    nodes, weights = [], []
    for _ in range(runs):
        z = rademacher(op.dim, gen, op.dtype, op.device)
        theta, w = quadrature(Lanczos(op.matvec, z, steps).run(steps))
        nodes.append(theta)
        weights.append(w)
    return nodes, weights


def overlap_of(op: HessianOperator, pairs: Eigenpairs) -> float:
    """‖P g‖² / ‖g‖², P the projection on the span of ``pairs.vectors`` (orthonormal), g the
    operator's gradient (Ghorbani et al. 2019, Sec. 4); NaN when g = 0."""
    g = op.gradient
    norm2 = float(torch.dot(g, g))
    if norm2 == 0:
        return math.nan
    return float((pairs.vectors @ g).square().sum()) / norm2


# -- one call on a model ---------------------------------------------------------------------


def top_eigenvalues(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, k: int = 1,
                    iters: int = 100, tol: float = 1e-3, seed: int = 0, params: Params = None,
                    *, bn: str | None = None,
                    population_batches: Iterable[Tensor] | None = None) -> Tensor:
    """The ``k`` largest eigenvalues of the Hessian of ``loss_fn(model(x), y)``, descending
    (float64, on the CPU): Lanczos with full reorthogonalization, at most ``iters`` Hessian-
    vector products, stopped at relative residual ``tol`` (:func:`top_eigenpairs_of`; a
    warning is logged when it does not converge). "Largest" is algebraic: negative
    eigenvalues of large magnitude are not among them (power iteration would find those)."""
    op = hessian_operator(model, loss_fn, x, y, params, bn, population_batches)
    return top_eigenpairs_of(op, k, iters, tol, seed).values


def trace(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, samples: int = 100,
          seed: int = 0, params: Params = None, *, bn: str | None = None,
          population_batches: Iterable[Tensor] | None = None) -> tuple[float, float]:
    """``(estimate, standard error)`` of the Hessian's trace by Hutchinson's method with
    ``samples`` Rademacher probes (:func:`trace_of`)."""
    op = hessian_operator(model, loss_fn, x, y, params, bn, population_batches)
    return trace_of(op, samples, seed)


def density(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, runs: int = 1,
            steps: int = 100, seed: int = 0, params: Params = None, *, bn: str | None = None,
            population_batches: Iterable[Tensor] | None = None, grid_points: int = 2001,
            broadening: float = 1e-3) -> tuple[Tensor, Tensor]:
    """``(grid, density)`` (float64): the Hessian's eigenvalue density by stochastic Lanczos
    quadrature, ``runs`` × ``steps`` Hessian-vector products (:func:`quadrature_of`), each
    node a Gaussian of standard deviation σ = ``broadening`` × the span of the nodes, on
    ``grid_points`` evenly spaced values from 6σ below the smallest node to 6σ above the
    largest (:func:`~bnlab.curvature.lanczos.broaden`). The density integrates to 1 and
    its first moment × the parameter count estimates the trace; draw it on a log scale, where
    the bulk near 0 and the isolated outliers both show."""
    validate_settings(grid_points=grid_points, broadening=broadening)
    op = hessian_operator(model, loss_fn, x, y, params, bn, population_batches)
    nodes, weights = quadrature_of(op, runs, steps, seed)
    grid, values, _ = broaden(nodes, weights, grid_points, broadening)
    return grid, values


def gradient_overlap(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, k: int,
                     iters: int = 100, tol: float = 1e-3, seed: int = 0, params: Params = None,
                     *, bn: str | None = None,
                     population_batches: Iterable[Tensor] | None = None) -> float:
    """Ghorbani et al.'s ‖P_k g‖² / ‖g‖²: the fraction of the gradient g (of the same loss, on
    the same batch) in the span of the Hessian's top-``k`` eigenvectors, from the Ritz vectors
    of :func:`top_eigenpairs_of` (accurate to about residual / eigenvalue gap)."""
    op = hessian_operator(model, loss_fn, x, y, params, bn, population_batches)
    return overlap_of(op, top_eigenpairs_of(op, k, iters, tol, seed))
