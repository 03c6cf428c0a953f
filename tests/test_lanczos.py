"""The Lanczos iteration and the measures on explicit symmetric matrices (float64)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bnlab.curvature import top_eigenpairs_of
from bnlab.curvature.lanczos import Lanczos, broaden, quadrature


def symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ for a random orthogonal Q."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def operator(a: torch.Tensor) -> SimpleNamespace:
    """The parts of a ``HessianOperator`` that ``top_eigenpairs_of`` uses."""
    return SimpleNamespace(dim=a.shape[0], dtype=a.dtype, device=a.device,
                           matvec=lambda v: a @ v)


def start(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_basis_stays_orthonormal_over_many_steps():
    """Without reorthogonalization the basis loses orthogonality once Ritz values converge
    (here to order 1 within these steps), and converged eigenvalues reappear as copies."""
    lam = torch.logspace(-3, 3, 200, dtype=torch.float64).tolist()
    a = symmetric(lam)
    run = Lanczos(lambda v: a @ v, start(200), 150).run(150)
    q = run.basis[: run.steps]
    assert float((q @ q.T - torch.eye(run.steps, dtype=torch.float64)).abs().max()) <= 1e-12
    theta = torch.linalg.eigvalsh(run.tridiagonal())
    # no ghost copies of the largest eigenvalue
    assert int((theta - lam[-1]).abs().le(1e-6 * lam[-1]).sum()) == 1
    torch.testing.assert_close(q @ a @ q.T, run.tridiagonal(), rtol=0, atol=1e-9)


def test_breakdown_ends_quadrature_and_restart_finds_repeated_eigenvalues():
    lam = [7.0, 7.0, 7.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, -2.0, 5.0]
    a = symmetric(lam)
    n = len(lam)
    alone = Lanczos(lambda v: a @ v, start(n), n).run(n)
    assert alone.done and alone.steps == len(set(lam))  # one vector per distinct eigenvalue
    nodes, weights = quadrature(alone)
    torch.testing.assert_close(nodes, torch.tensor(sorted(set(lam)), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    v = alone.basis[0]
    for p in range(6):  # exact for every polynomial once the space is invariant
        assert float((weights * nodes ** p).sum()) == pytest.approx(
            float(v @ torch.linalg.matrix_power(a, p) @ v), rel=1e-10, abs=1e-12)
    restarted = Lanczos(lambda v: a @ v, start(n), n, torch.Generator().manual_seed(3)).run(n)
    assert restarted.steps == n
    torch.testing.assert_close(torch.linalg.eigvalsh(restarted.tridiagonal()),
                               torch.tensor(sorted(lam), dtype=torch.float64), rtol=0, atol=1e-12)


def test_top_eigenpairs_with_a_repeated_top_eigenvalue():
    lam = [10.0, 10.0, 10.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0, -1.0]
    a = symmetric(lam, seed=4)
    pairs = top_eigenpairs_of(operator(a), k=4, iters=len(lam), tol=1e-14)
    torch.testing.assert_close(pairs.values, torch.tensor([10.0, 10, 10, 4],
                                                          dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(pairs.vectors @ pairs.vectors.T,
                               torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    for value, vector in zip(pairs.values, pairs.vectors, strict=True):
        torch.testing.assert_close(a @ vector, value * vector, rtol=0, atol=1e-9)


def test_top_means_algebraically_largest():
    """Power iteration would return -100; the k largest eigenvalues are 5 and 4."""
    lam = [-100.0, -50.0, 5.0, 4.0, 3.0, 1.0, 0.0, -1.0]
    pairs = top_eigenpairs_of(operator(symmetric(lam)), k=2, iters=8, tol=1e-12)
    torch.testing.assert_close(pairs.values, torch.tensor([5.0, 4.0], dtype=torch.float64),
                               rtol=0, atol=1e-10)


def test_broadening_keeps_mass_and_mean():
    nodes = [torch.tensor([-1.0, 0.0, 20.0], dtype=torch.float64),
             torch.tensor([0.5, 30.0], dtype=torch.float64)]
    weights = [torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64),
               torch.tensor([0.6, 0.4], dtype=torch.float64)]
    grid, dens, sigma = broaden(nodes, weights, 2001, 1e-3)
    assert sigma == pytest.approx(31e-3)
    assert grid[0] == pytest.approx(-1 - 6 * sigma) and grid[-1] == pytest.approx(30 + 6 * sigma)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-8)
    mean = sum(float((t * w).sum()) for t, w in zip(nodes, weights, strict=True)) / 2
    assert float(torch.trapezoid(grid * dens, grid)) == pytest.approx(mean, rel=1e-8)
    # a peak of weight w has height w / (runs · σ√(2π)) at its node
    peak = dens[(grid - 30.0).abs().argmin()]
    assert float(peak) == pytest.approx(0.4 / (2 * sigma * (2 * torch.pi) ** 0.5), rel=1e-2)


def test_residual_bounds_count_a_coupling_dropped_at_a_near_breakdown():
    """A start vector with a 1e-12 component on one eigenvector: after 5 steps beta is tiny but
    not 0; treated as a breakdown, it must still enter the residual bounds."""
    lam = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
    a = symmetric(lam, seed=6)
    u = torch.linalg.eigh(a).eigenvectors
    v0 = u[:, :5].sum(1) + 1e-12 * u[:, 5]
    run = Lanczos(lambda v: a @ v, v0, 6).run(6)
    assert run.steps == 5 and len(run.dropped) == 1 and run.dropped[0][1] > 1e-13
    theta, s, bound = run.ritz()
    y = run.ritz_vectors(s)
    true = torch.linalg.vector_norm(y @ a - theta[:, None] * y, dim=1)
    assert torch.all(true <= bound + 1e-14) and float(true.max()) > 1e-13
