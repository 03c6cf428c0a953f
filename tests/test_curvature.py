"""bnlab.curvature against the exact Hessian (torch.func over a plain-ops twin, float64): the top
eigenvalues, trace, density and gradient overlap; the Hessian of the right function for each
statistics mode and parameter block; read-only; bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import curvature as cv
from bnlab.errors import UsageError
from tests.curvature_nets import batch, exact, operator_matrix, oracle_twin, tiny_net

NETS = [pytest.param(norm, train, id=f"{'bn' if norm else 'plain'}-{'train' if train else 'eval'}")
        for norm in (True, False) for train in (True, False)]


def net_in_mode(norm: bool, train: bool, dropout: float = 0.0) -> nn.Module:
    return tiny_net(norm, dropout).train(train)


@pytest.mark.parametrize(("norm", "train"), NETS)
def test_operator_is_the_exact_hessian_and_gradient(norm, train):
    net = net_in_mode(norm, train)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y)
    h, g = exact(oracle_twin(net), x, y)
    assert op.dim == h.shape[0]
    torch.testing.assert_close(operator_matrix(op), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.gradient, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("norm", "train"), NETS)
def test_top_k_and_overlap_are_exact(norm, train):
    net = net_in_mode(norm, train)
    x, y = batch()
    h, g = exact(oracle_twin(net), x, y)
    lam, u = torch.linalg.eigh(h)
    k = 4
    values = cv.top_eigenvalues(net, F.cross_entropy, x, y, k=k, tol=1e-10)
    torch.testing.assert_close(values, lam.flip(0)[:k], rtol=0, atol=1e-6)
    assert torch.all(values[:-1] >= values[1:])  # descending
    top = u[:, -k:]
    expected = float((top.T @ g).square().sum() / g.square().sum())
    overlap = cv.gradient_overlap(net, F.cross_entropy, x, y, k, tol=1e-10)
    assert abs(overlap - expected) <= 1e-6


def test_lanczos_stops_at_its_tolerance_before_the_dimension():
    net = net_in_mode(True, True)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y)
    lam = torch.linalg.eigvalsh(operator_matrix(op)).flip(0)
    pairs = cv.top_eigenpairs_of(op, k=2, iters=op.dim, tol=1e-8)
    assert pairs.converged and pairs.steps < op.dim // 2
    # each Ritz value is within its residual of an eigenvalue
    assert torch.all((pairs.values - lam[:2]).abs() <= pairs.residuals + 1e-12)
    h = operator_matrix(op)
    for value, vector, residual in zip(pairs.values, pairs.vectors, pairs.residuals,
                                       strict=True):
        assert float(torch.linalg.vector_norm(h @ vector - value * vector)) == pytest.approx(
            float(residual), rel=1e-4, abs=1e-12)


def test_unconverged_lanczos_says_so(caplog):
    net = net_in_mode(True, True)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y)
    pairs = cv.top_eigenpairs_of(op, k=3, iters=4, tol=1e-12)
    assert not pairs.converged and pairs.steps == 4
    assert "not converged after 4 Lanczos steps" in caplog.text


def test_trace_within_its_standard_error_and_the_error_is_the_estimators():
    net = net_in_mode(True, True)
    x, y = batch()
    h, _ = exact(oracle_twin(net), x, y)
    samples = 200
    estimate, se = cv.trace(net, F.cross_entropy, x, y, samples=samples, seed=3)
    assert abs(estimate - float(h.trace())) <= 3 * se
    # Rademacher probes: Var(zᵀHz) = 2 Σ_{i≠j} H_ij², so the reported error is the estimator's
    off = h - torch.diag(h.diagonal())
    expected_se = math.sqrt(2 * float(off.square().sum()) / samples)
    assert se == pytest.approx(expected_se, rel=0.2)


class Scale(nn.Module):
    """y = w ⊙ x: with a squared-error loss its Hessian is diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 2.0, 7, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_trace_is_exact_where_hutchinson_has_no_variance():
    """With a diagonal H every Rademacher probe gives zᵀHz = tr H exactly (the variance is
    2 Σ_{i≠j} H_ij² = 0): the estimate is exact, with a zero error, however few probes."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 7, generator=gen, dtype=torch.float64), torch.zeros(9, 7,
                                                                            dtype=torch.float64)
    estimate, se = cv.trace(Scale(), F.mse_loss, x ** 3, y, samples=2)
    exact_trace = float(2 * (x ** 3).square().mean(0).sum() / 7)  # d²/dw² of mean((wx)²)
    assert estimate == pytest.approx(exact_trace, rel=1e-13) and se <= 1e-12


@pytest.mark.parametrize(("norm", "train"), NETS)
def test_density_integrates_to_one_and_its_mean_is_the_trace(norm, train):
    net = net_in_mode(norm, train)
    x, y = batch()
    runs, seed = 3, 5
    grid, dens = cv.density(net, F.cross_entropy, x, y, runs=runs, steps=12, seed=seed)
    assert torch.all(dens >= 0)
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    dim = sum(p.numel() for p in net.parameters())
    first_moment = float(torch.trapezoid(grid * dens, grid))
    # the same Rademacher draws as Hutchinson's with the same seed
    hutchinson, _ = cv.trace(net, F.cross_entropy, x, y, samples=runs, seed=seed)
    assert first_moment * dim == pytest.approx(hutchinson, rel=1e-6, abs=1e-6)


def test_quadrature_matches_the_moments_of_the_exact_hessian():
    """Gauss quadrature from m Lanczos steps is exact for vᵀHᵖv, p < 2m; with m = dim the nodes
    are the eigenvalues."""
    net = net_in_mode(True, True)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y)
    h, _ = exact(oracle_twin(net), x, y)
    steps = 4
    (nodes,), (weights,) = cv.quadrature_of(op, runs=1, steps=steps, seed=2)
    gen = torch.Generator().manual_seed(2)
    v = (2 * torch.randint(0, 2, (op.dim,), generator=gen) - 1).double() / math.sqrt(op.dim)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    hv = v
    for p in range(1, 2 * steps):
        hv = h @ hv
        scale = float(torch.linalg.eigvalsh(h).abs().max()) ** p
        assert float((weights * nodes ** p).sum()) == pytest.approx(float(v @ hv),
                                                                   abs=1e-9 * scale), p
    (nodes,), _ = cv.quadrature_of(op, runs=1, steps=op.dim, seed=2)
    lam = torch.linalg.eigvalsh(h)
    assert (lam[:, None] - nodes[None, :]).abs().min(1).values.max() <= 1e-8


# -- which function: statistics modes, parameter blocks, dropout ---------------------------


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_bn_mode_gives_the_hessian_of_that_function(train, bn):
    net = net_in_mode(True, train)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y, bn=bn)
    h, _ = exact(oracle_twin(net, bn_train=bn == "batch"), x, y)
    torch.testing.assert_close(operator_matrix(op), h, rtol=1e-10, atol=1e-10)


def test_default_mode_follows_the_model():
    assert cv.resolve_bn(net_in_mode(True, True), None) == "batch"
    assert cv.resolve_bn(net_in_mode(True, False), None) == "running"


def population_stats(net: nn.Module, inputs: list[torch.Tensor]) -> dict:
    """Each BN layer's population mean and unbiased variance over every input it sees in a
    train-mode forward of each batch (computed on the plain twin, all values at once)."""
    twin = oracle_twin(net, bn_train=True)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0]))
               for n, m in twin.named_modules() if hasattr(m, "running_var")]
    with torch.no_grad():
        for xb in inputs:
            twin(xb)
    for handle in handles:
        handle.remove()
    stats = {}
    for name, xs in seen.items():
        values = torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1]) for x in xs])
        stats[name] = (values.mean(0), values.var(0, correction=1))
    return stats


@pytest.mark.parametrize("train", [True, False])
def test_population_mode_is_the_hessian_with_population_statistics(train):
    net = net_in_mode(True, train)
    x, y = batch()
    inputs = [batch(8, seed=s)[0] for s in range(10, 14)]
    op = cv.hessian_operator(net, F.cross_entropy, x, y, bn="population",
                             population_batches=iter(inputs))
    h, _ = exact(oracle_twin(net, bn_train=False, stats=population_stats(net, inputs)), x, y)
    torch.testing.assert_close(operator_matrix(op), h, rtol=1e-9, atol=1e-9)
    h_running, _ = exact(oracle_twin(net, bn_train=False), x, y)
    assert not torch.allclose(h, h_running, rtol=1e-3)  # the modes differ here


ALL = ["0.weight", "1.weight", "1.bias", "5.weight", "6.weight", "6.bias", "8.weight", "8.bias"]


@pytest.mark.parametrize(("params", "names"), [
    ("0", ["0.weight"]), ("6", ["6.weight", "6.bias"]), ("8.weight", ["8.weight"]),
    (["8.bias", "0", "0.weight"], ["0.weight", "8.bias"]), ("", ALL), (None, ALL)])
def test_parameter_blocks_are_the_principal_blocks(params, names):
    net = net_in_mode(True, True)
    x, y = batch()
    assert cv.select_parameters(net, params) == names
    op = cv.hessian_operator(net, F.cross_entropy, x, y, params=params)
    h, g = exact(oracle_twin(net), x, y, names)
    torch.testing.assert_close(operator_matrix(op), h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(op.gradient, g, rtol=1e-10, atol=1e-12)
    values = cv.top_eigenvalues(net, F.cross_entropy, x, y, k=1, tol=1e-10, params=params)
    assert float(values[0]) == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), abs=1e-6)


def test_dropout_is_one_fixed_mask_and_follows_the_model_not_bn():
    """Train mode with bn='running': BN uses running statistics, dropout stays on, with the
    mask drawn under the probe seed; every call sees the same function."""
    net = net_in_mode(True, True, dropout=0.5)
    x, y = batch()
    op = cv.hessian_operator(net, F.cross_entropy, x, y, bn="running")
    h, _ = exact(oracle_twin(net, bn_train=False, x=x), x, y)
    torch.testing.assert_close(operator_matrix(op), h, rtol=1e-10, atol=1e-10)
    first = cv.top_eigenvalues(net, F.cross_entropy, x, y, k=2, bn="running", seed=1)
    assert torch.equal(first, cv.top_eigenvalues(net, F.cross_entropy, x, y, k=2,
                                                 bn="running", seed=1))


def test_float32_model_agrees_with_float64():
    net = net_in_mode(True, True)
    x, y = batch()
    lam64 = cv.top_eigenvalues(net, F.cross_entropy, x, y, k=2, tol=1e-8)
    lam32 = cv.top_eigenvalues(net.float(), F.cross_entropy, x.float(), y, k=2, tol=1e-5)
    torch.testing.assert_close(lam32, lam64, rtol=1e-4, atol=1e-4)


# -- read-only ------------------------------------------------------------------------------


def snapshot(net: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in net.state_dict().items()},
            {n: p.grad.clone() for n, p in net.named_parameters()},
            [m.training for m in net.modules()], torch.get_rng_state())


@pytest.mark.parametrize("bn", ["batch", "running", "population"])
def test_nothing_of_the_model_or_the_rng_changes(bn):
    net = net_in_mode(True, True, dropout=0.3)
    x, y = batch()
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    torch.manual_seed(123)
    before = snapshot(net)
    kw = {"bn": bn, "population_batches": [batch(8, seed=20)[0]]}
    cv.top_eigenvalues(net, F.cross_entropy, x, y, k=2, iters=5, **kw)
    cv.trace(net, F.cross_entropy, x, y, samples=3, **kw)
    cv.density(net, F.cross_entropy, x, y, runs=1, steps=4, **kw)
    cv.gradient_overlap(net, F.cross_entropy, x, y, 2, iters=5, params="6", **kw)
    after = snapshot(net)
    for a, b in zip(before[:2], after[:2], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert before[2] == after[2] and torch.equal(before[3], after[3])


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k": 200}, "k=200 is larger than the number of parameters (109)"),
    ({"k": 0}, "k=0 is invalid; allowed: an integer >= 1"),
    ({"k": 5, "iters": 3}, "k=5 needs iters >= k"),
    ({"params": "no.such"}, "params='no.such' is not a module path or parameter of the model"),
    ({"params": "2"}, "params='2': module '2' has no trainable parameters"),
    ({"bn": "eval"}, "bn='eval' is invalid; allowed: batch, running, population"),
    ({"bn": "population"}, "bn='population' needs population_batches"),
])
def test_bad_input_is_a_one_line_usage_error(kwargs, message):
    net = net_in_mode(True, True)
    x, y = batch()
    with pytest.raises(UsageError) as info:
        cv.top_eigenvalues(net, F.cross_entropy, x, y, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_trace_needs_two_samples_for_its_error():
    with pytest.raises(UsageError, match="samples=1 is invalid"):
        cv.trace(net_in_mode(True, True), F.cross_entropy, *batch(), samples=1)
