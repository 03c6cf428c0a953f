"""Decorrelated BN (group-wise ZCA) and IterNorm: bnlab.nn.decorrelated against float64 oracles.

The oracles are written from the formulas with explicit per-group loops over a (C, m) matrix,
independent of the layer's batched, layout-dependent code paths.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab.nn.whitening as whitening_module
from bnlab.nn.decorrelated import DecorrelatedBatchNorm1d, DecorrelatedBatchNorm2d

F64 = torch.float64
WHITENINGS = ["zca", "iter"]
# (layer class, input shape, memory format): the channels-first (grouped) and channels-last /
# (N, C) (dense) code paths; 10 channels in groups of 4 leave a last group of 2.
CASES = {
    "2d": (DecorrelatedBatchNorm2d, (6, 10, 3, 4), torch.contiguous_format),
    "2d-cl": (DecorrelatedBatchNorm2d, (6, 10, 3, 4), torch.channels_last),
    "1d-NC": (DecorrelatedBatchNorm1d, (40, 10), torch.contiguous_format),
    "1d-NCL": (DecorrelatedBatchNorm1d, (5, 10, 6), torch.contiguous_format),
}


# ------------------------------------------------------------------------------------------
# Oracles
# ------------------------------------------------------------------------------------------


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *) -> (C, m) in float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def oracle_inv_sqrt(sigma: torch.Tensor, whitening: str, iterations: int) -> torch.Tensor:
    """ZCA by eigendecomposition, or the paper's (uncoupled) Newton iteration literally."""
    if whitening == "zca":
        lam, u = torch.linalg.eigh(sigma)
        return u @ torch.diag(lam.rsqrt()) @ u.T
    trace = torch.trace(sigma)
    sigma_n = sigma / trace
    p = torch.eye(sigma.shape[0], dtype=F64)
    for _ in range(iterations):
        p = (3 * p - p @ p @ p @ sigma_n) / 2
    return p / trace.sqrt()


def oracle_stats(x, group_size, eps=1e-5, whitening="zca", iterations=5):
    """(mean (C,), block-diagonal W (C, C)) of a training batch."""
    xm = as_matrix(x)
    c, m = xm.shape
    mean = xm.mean(1)
    xc = xm - mean[:, None]
    w = torch.zeros(c, c, dtype=F64)
    for start in range(0, c, group_size):
        g = slice(start, min(start + group_size, c))
        sigma = xc[g] @ xc[g].T / m + eps * torch.eye(g.stop - g.start, dtype=F64)
        w[g, g] = oracle_inv_sqrt(sigma, whitening, iterations)
    return mean, w


def oracle_forward(x, mean, w, gamma, beta):
    """gamma * (W (x - mean)) + beta at every position, back in x's shape."""
    y = w.double() @ (as_matrix(x) - mean.double()[:, None])
    y = gamma.double()[:, None] * y + beta.double()[:, None]
    rest = x.shape[2:]
    return y.reshape(x.shape[1], x.shape[0], *rest).transpose(0, 1)


def correlated(shape, seed=0, dtype=F64, fmt=torch.contiguous_format, shared=0.6):
    """Input whose channels share a common factor (correlated within and across groups), with
    per-channel offsets and scales."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *rest = shape
    z = torch.randn(n, 1, *rest, generator=gen, dtype=F64)
    noise = torch.randn(shape, generator=gen, dtype=F64)
    offset = torch.randn(c, generator=gen, dtype=F64).view(1, c, *[1] * len(rest))
    scale = (torch.rand(c, generator=gen, dtype=F64) + 0.5).view(1, c, *[1] * len(rest))
    x = scale * (shared * z + noise) + 3 * offset
    return x.to(dtype).contiguous(memory_format=fmt)


def make_layer(cls, c, seed=0, dtype=F64, **kwargs):
    layer = cls(c, dtype=dtype, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(c, generator=gen, dtype=F64) + 0.5)
        layer.bias.copy_(torch.randn(c, generator=gen, dtype=F64))
    return layer


def group_blocks(c, g):
    return [slice(s, min(s + g, c)) for s in range(0, c, g)]


# ------------------------------------------------------------------------------------------
# Training output against the oracle, and its whitening properties
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitening", WHITENINGS)
@pytest.mark.parametrize("case", CASES)
def test_training_matches_oracle(case, whitening):
    cls, shape, fmt = CASES[case]
    layer = make_layer(cls, shape[1], group_size=4, whitening=whitening)
    x = correlated(shape, fmt=fmt)
    y = layer(x)
    mean, w = oracle_stats(x, 4, whitening=whitening)
    torch.testing.assert_close(y, oracle_forward(x, mean, w, layer.weight, layer.bias))
    assert y.shape == x.shape and y.stride() == x.stride()
    bmean, bw = layer.batch_whitening(x)
    torch.testing.assert_close(bmean, mean)
    torch.testing.assert_close(bw, w)


@pytest.mark.parametrize("case", ["2d", "2d-cl", "1d-NC"])
def test_training_output_is_whitened_per_group(case):
    cls, shape, fmt = CASES[case]
    shape = (64, *shape[1:])
    layer = cls(10, group_size=4, dtype=F64)  # γ = 1, β = 0: the output is W x_c
    x = correlated(shape, fmt=fmt)
    y = as_matrix(layer(x))
    torch.testing.assert_close(y.mean(1), torch.zeros(10, dtype=F64), atol=1e-12, rtol=0)
    cov = y @ y.T / y.shape[1]
    # W Σ0 W = Σ0 (Σ0 + eps)^-1 = I - eps (Σ0 + eps)^-1: identity up to eps / λ_min.
    for g in group_blocks(10, 4):
        torch.testing.assert_close(
            cov[g, g], torch.eye(g.stop - g.start, dtype=F64), atol=1e-4, rtol=0
        )
    # Groups are whitened independently: the shared factor still correlates them.
    assert cov[0:4, 4:8].abs().max() > 0.1
    assert cov[4:8, 8:10].abs().max() > 0.1


def test_last_smaller_group_is_whitened_on_its_own():
    x = correlated((32, 10, 3, 3))
    layer = DecorrelatedBatchNorm2d(10, group_size=4, dtype=F64)
    layer(x)
    w = layer.running_whitening
    mask = torch.zeros(10, 10, dtype=torch.bool)
    for g in group_blocks(10, 4):
        mask[g, g] = True
    assert torch.all(w[~mask] == 0), "running_whitening must be zero outside the groups"
    # The last group's block depends on channels 8, 9 only.
    alone = DecorrelatedBatchNorm2d(2, group_size=4, dtype=F64)
    alone(x[:, 8:])
    torch.testing.assert_close(w[8:, 8:], alone.running_whitening)
    # group_size >= C: a single group.
    one = DecorrelatedBatchNorm2d(10, group_size=16, dtype=F64)
    one(x)
    torch.testing.assert_close(
        one.running_whitening, 0.9 * torch.eye(10, dtype=F64) + 0.1 * oracle_stats(x, 10)[1]
    )


# ------------------------------------------------------------------------------------------
# group_size = 1 is batch norm (training mode)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitening", WHITENINGS)
@pytest.mark.parametrize(
    "cls, ref_cls, shape, fmt",
    [
        (DecorrelatedBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6), torch.contiguous_format),
        (DecorrelatedBatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6), torch.channels_last),
        (DecorrelatedBatchNorm1d, nn.BatchNorm1d, (16, 3), torch.contiguous_format),
        (DecorrelatedBatchNorm1d, nn.BatchNorm1d, (4, 3, 7), torch.contiguous_format),
    ],
    ids=["2d", "2d-cl", "1d-NC", "1d-NCL"],
)
def test_group_size_one_is_batch_norm_in_training(cls, ref_cls, shape, fmt, whitening):
    # IterNorm with a 1x1 Σ: Σ_N = 1, so P_T = 1 and W = 1/sqrt(Σ) after any number of steps.
    ours = make_layer(cls, 3, group_size=1, whitening=whitening)
    ref = ref_cls(3, dtype=F64)
    ref.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if k in ("weight", "bias")}, strict=False
    )
    x = correlated(shape, fmt=fmt)
    g = torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        outs.append((y, *torch.autograd.grad(y, [xi, m.weight, m.bias], g)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    # running_whitening is the running average of 1/sqrt(biased var + eps), not of the var.
    var = as_matrix(x).var(1, correction=0)
    expected = torch.diag(0.9 + 0.1 / torch.sqrt(var + 1e-5))
    torch.testing.assert_close(ours.running_whitening, expected)


# ------------------------------------------------------------------------------------------
# IterNorm converges to ZCA
# ------------------------------------------------------------------------------------------


def spectrum_input(eigenvalues, m=4096, seed=0):
    """(m, s) samples whose covariance is exactly Q diag(eigenvalues) Q^T."""
    gen = torch.Generator().manual_seed(seed)
    s = len(eigenvalues)
    z = torch.randn(m, s, generator=gen, dtype=F64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / m)).T  # exactly white
    q, _ = torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=F64))
    return z @ torch.diag(torch.tensor(eigenvalues, dtype=F64).sqrt()) @ q.T


def test_iternorm_converges_to_zca():
    x = spectrum_input(torch.linspace(1, 3, 8).tolist())  # well-conditioned Σ
    _, zca = DecorrelatedBatchNorm1d(8, group_size=8, dtype=F64).batch_whitening(x)
    errors = []
    for t in (1, 2, 3, 5, 8, 20):
        layer = DecorrelatedBatchNorm1d(8, group_size=8, whitening="iter", iterations=t, dtype=F64)
        errors.append((layer.batch_whitening(x)[1] - zca).abs().max().item())
    assert all(a > b for a, b in itertools.pairwise(errors[:-1])), errors
    assert errors[0] > 0.05 and errors[-1] < 1e-12, errors


def test_iternorm_stays_converged_on_an_ill_conditioned_covariance():
    """The paper's uncoupled iteration amplifies rounding errors once converged unless
    λ_max/λ_min < 2.44; the layer's coupled form computes the same iterates stably."""
    x = spectrum_input(torch.logspace(0, 3, 8).tolist())
    _, zca = DecorrelatedBatchNorm1d(8, group_size=8, dtype=F64).batch_whitening(x)
    sigma = x.T @ x / x.shape[0] + 1e-5 * torch.eye(8, dtype=F64)
    for t, tol in ((5, 1e-12), (60, 1e-9)):
        layer = DecorrelatedBatchNorm1d(8, group_size=8, whitening="iter", iterations=t, dtype=F64)
        w = layer.batch_whitening(x)[1]
        literal = oracle_inv_sqrt(sigma, "iter", t)
        if t == 5:  # same iterates as the paper's formula while that one is still accurate
            torch.testing.assert_close(w, literal, atol=tol, rtol=0)
        else:
            assert not torch.allclose(literal, zca, atol=1e-3), "the literal form should diverge"
            torch.testing.assert_close(w, zca, atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def layer_fn(layer):
    """The layer's training output as a function of (x, weight, bias), for gradcheck."""
    return lambda x, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))


@pytest.mark.parametrize("whitening", WHITENINGS)
@pytest.mark.parametrize(
    "cls, shape, fmt",
    [
        (DecorrelatedBatchNorm2d, (3, 5, 2, 3), torch.contiguous_format),
        (DecorrelatedBatchNorm2d, (3, 5, 2, 3), torch.channels_last),
        (DecorrelatedBatchNorm1d, (8, 5), torch.contiguous_format),
    ],
    ids=["2d", "2d-cl", "1d-NC"],
)
def test_gradcheck(cls, shape, fmt, whitening):
    layer = make_layer(cls, 5, group_size=3, whitening=whitening)
    x = correlated(shape, fmt=fmt).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(layer_fn(layer), (x, w, b))


def test_iternorm_double_backward():
    layer = make_layer(DecorrelatedBatchNorm2d, 4, group_size=2, whitening="iter")
    x = correlated((3, 4, 2, 2)).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(layer_fn(layer), (x, w, b))


def equal_eigenvalue_input():
    """(8, 3) values with covariance exactly diag(1, 1, 4): columns of a Hadamard matrix are
    orthogonal to each other and to the all-ones vector (zero mean)."""
    h = torch.ones(1, 1, dtype=F64)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h[:, 1:4] * torch.tensor([1.0, 1.0, 2.0], dtype=F64)


def test_equal_eigenvalues_backward_is_finite_and_correct():
    x = equal_eigenvalue_input()
    g = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    # The naive route, autograd through eigh, divides by λ_1 - λ_2 = 0.
    xn = x.clone().requires_grad_()
    xc = xn - xn.mean(0)
    lam, u = torch.linalg.eigh(xc.T @ xc / 8 + 1e-5 * torch.eye(3, dtype=F64))
    assert lam[0] == lam[1]
    ((xc @ (u @ torch.diag(lam.rsqrt()) @ u.T)) * g).sum().backward()
    assert not torch.isfinite(xn.grad).all()
    # Ours: finite, matches finite differences, and equals IterNorm's converged gradient.
    layer = DecorrelatedBatchNorm1d(3, group_size=3, dtype=F64)
    xz = x.clone().requires_grad_()
    (gz,) = torch.autograd.grad(layer(xz), xz, g)
    assert torch.isfinite(gz).all()
    w, b = layer.weight.detach().requires_grad_(), layer.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(layer_fn(layer), (x.clone().requires_grad_(), w, b))
    it = DecorrelatedBatchNorm1d(3, group_size=3, whitening="iter", iterations=40, dtype=F64)
    xi = x.clone().requires_grad_()
    (gi,) = torch.autograd.grad(it(xi), xi, g)
    torch.testing.assert_close(gz, gi, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------
# Running statistics, eval mode, state dict
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitening", WHITENINGS)
@pytest.mark.parametrize("momentum", [0.3, None])
def test_running_statistics_follow_the_momentum_rule(momentum, whitening):
    layer = make_layer(
        DecorrelatedBatchNorm2d, 10, group_size=4, momentum=momentum, whitening=whitening
    )
    mean_ref = torch.zeros(10, dtype=F64)
    w_ref = torch.eye(10, dtype=F64)
    for step in range(1, 4):
        x = correlated(
            (4, 10, 3, 3),
            seed=step,
            fmt=torch.channels_last if step == 2 else torch.contiguous_format,
        )
        layer(x)
        mean, w = oracle_stats(x, 4, whitening=whitening)
        f = 1 / step if momentum is None else momentum
        mean_ref = (1 - f) * mean_ref + f * mean
        w_ref = (1 - f) * w_ref + f * w
    torch.testing.assert_close(layer.running_mean, mean_ref)
    torch.testing.assert_close(layer.running_whitening, w_ref)
    assert layer.num_batches_tracked.item() == 3


@pytest.mark.parametrize("case", CASES)
def test_eval_uses_the_running_statistics(case):
    cls, shape, fmt = CASES[case]
    layer = make_layer(cls, 10, group_size=4)
    for seed in range(3):
        layer(correlated(shape, seed=seed, fmt=fmt))
    layer.eval()
    x = correlated(shape, seed=7, fmt=fmt)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    torch.testing.assert_close(
        y, oracle_forward(x, layer.running_mean, layer.running_whitening, layer.weight, layer.bias)
    )
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"
    # Set by hand (as Precise BN does): the buffers are what eval reads.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(10, generator=gen, dtype=F64))
        layer.running_whitening.copy_(layer.whitening_from_covariance(torch.eye(10, dtype=F64) * 4))
    torch.testing.assert_close(
        layer(x),
        oracle_forward(
            x, layer.running_mean, torch.eye(10, dtype=F64) / 2, layer.weight, layer.bias
        ),
        atol=1e-5,
        rtol=1e-5,
    )


def test_state_dict_round_trip():
    layer = make_layer(DecorrelatedBatchNorm2d, 10, group_size=4, whitening="iter")
    for seed in range(2):
        layer(correlated((4, 10, 3, 3), seed=seed))
    state = layer.state_dict()
    assert set(state) == {
        "weight",
        "bias",
        "running_mean",
        "running_whitening",
        "num_batches_tracked",
    }
    fresh = DecorrelatedBatchNorm2d(10, group_size=4, whitening="iter", dtype=F64)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    layer.eval()
    fresh.eval()
    x = correlated((4, 10, 3, 3), seed=5)
    assert torch.equal(layer(x), fresh(x))
    plain = DecorrelatedBatchNorm2d(10, affine=False)
    assert set(plain.state_dict()) == {"running_mean", "running_whitening", "num_batches_tracked"}


def test_whitening_from_covariance_reads_the_group_blocks_only():
    x = correlated((16, 10, 2, 2))
    for whitening in WHITENINGS:
        layer = DecorrelatedBatchNorm2d(10, group_size=4, whitening=whitening, dtype=F64)
        xc = as_matrix(x) - as_matrix(x).mean(1, keepdim=True)
        cov = xc @ xc.T / xc.shape[1]
        _, w = layer.batch_whitening(x)
        torch.testing.assert_close(layer.whitening_from_covariance(cov), w)
        # Entries outside the groups are ignored.
        noisy = (
            cov
            + torch.ones(10, 10, dtype=F64)
            - torch.block_diag(*[torch.ones(4, 4), torch.ones(4, 4), torch.ones(2, 2)]).double()
        )
        torch.testing.assert_close(layer.whitening_from_covariance(noisy), w)
    with pytest.raises(ValueError, match=r"\(10, 10\) covariance"):
        layer.whitening_from_covariance(torch.eye(9))


# ------------------------------------------------------------------------------------------
# Layouts, dtypes, compile, kernels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("whitening", WHITENINGS)
def test_channels_last_matches_contiguous(whitening):
    x = correlated((4, 10, 5, 3), dtype=torch.float32)
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        layer = make_layer(
            DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32, whitening=whitening
        )
        xi = x.clone(memory_format=fmt).requires_grad_()
        y = layer(xi)
        assert y.is_contiguous(memory_format=fmt)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        assert xi.grad.is_contiguous(memory_format=fmt)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, layer.running_whitening))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    x = correlated((8, 10, 3, 3), dtype=torch.float32).to(dtype)
    half = make_layer(DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32)
    full = make_layer(DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32)
    y = half(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, full(x.float()).to(dtype))
    torch.testing.assert_close(half.running_whitening, full.running_whitening)
    y.float().sum().backward()
    assert torch.isfinite(half.weight.grad).all()


@pytest.mark.parametrize("whitening", WHITENINGS)
def test_autocast_does_not_lower_the_precision(whitening):
    """Like torch's norm layers, the layer computes in float32/float64 under autocast."""
    layer = make_layer(
        DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32, whitening=whitening
    )
    x = correlated((8, 10, 3, 3), dtype=torch.bfloat16, fmt=torch.channels_last)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(layer.batch_whitening(x), layer.batch_whitening(x.float()))


@pytest.mark.slow
@pytest.mark.parametrize("whitening", WHITENINGS)
def test_torch_compile_matches_eager(whitening):
    torch._dynamo.reset()
    eager = make_layer(
        DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32, whitening=whitening
    )
    ours = make_layer(
        DecorrelatedBatchNorm2d, 10, group_size=4, dtype=torch.float32, whitening=whitening
    )
    compiled = torch.compile(ours, backend="aot_eager")
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = correlated((4, 10, 3, 3), dtype=torch.float32, fmt=fmt)
        g = torch.randn_like(x)
        outs = []
        for m, fn in ((eager, eager), (ours, compiled)):
            xi = x.clone().requires_grad_()
            y = fn(xi)
            outs.append((y, *torch.autograd.grad(y, [xi, m.weight, m.bias], g)))
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b)
    for m in (eager, ours):
        m.eval()
    torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(ours.running_whitening, eager.running_whitening)
    torch.testing.assert_close(ours.running_mean, eager.running_mean)


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("whitening", WHITENINGS)
@pytest.mark.parametrize("case", CASES)
def test_no_native_norm_kernel(case, whitening):
    cls, shape, fmt = CASES[case]
    layer = make_layer(cls, 10, group_size=4, whitening=whitening)
    x = correlated(shape, fmt=fmt).requires_grad_()
    with _RecordOps() as rec:
        layer(x).sum().backward()
        layer.eval()
        layer(x)
    banned = ("batch_norm", "group_norm", "layer_norm", "instance_norm", "native_")
    assert not [op for op in rec.ops if any(b in op for b in banned)], sorted(rec.ops)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 0}, "group_size must be an integer >= 1, got 0"),
        ({"group_size": 2.0}, "group_size must be an integer >= 1, got 2.0"),
        ({"group_size": True}, "group_size must be an integer >= 1, got True"),
        ({"whitening": "pca"}, "whitening must be one of .*, got 'pca'"),
        ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
        ({"iterations": 2.5}, "iterations must be an integer >= 1, got 2.5"),
        ({"eps": 0.0}, "eps must be a number > 0, got 0.0"),
        ({"eps": -1e-5}, "eps must be a number > 0, got -1e-05"),
        ({"eps": math.nan}, "eps must be a number > 0, got nan"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecorrelatedBatchNorm2d(8, **kwargs)


def test_input_errors():
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        DecorrelatedBatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        DecorrelatedBatchNorm2d(4)(torch.randn(1, 4, 1, 1))
    layer = DecorrelatedBatchNorm2d(4).eval()
    assert layer(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)  # eval needs no batch statistics
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        DecorrelatedBatchNorm2d(4)(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        DecorrelatedBatchNorm1d(4)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"expected 4 channels"):
        DecorrelatedBatchNorm2d(4)(torch.randn(2, 5, 3, 3))


# (layer class, input shape, memory format) whose groups are all of one size in dense data:
# the column groups of one (m, C) matrix, computed together (whitening.GroupedRows).
ONE_RUN = {
    "2d-cl": (DecorrelatedBatchNorm2d, (6, 8, 3, 4), torch.channels_last),
    "1d-NC": (DecorrelatedBatchNorm1d, (40, 8), torch.contiguous_format),
}


def _count_grouped_rows(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = whitening_module.GroupedRows.apply

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(whitening_module.GroupedRows, "apply", spy)
    return calls


@pytest.mark.parametrize("whitening_kind", WHITENINGS)
@pytest.mark.parametrize("case", list(ONE_RUN))
def test_column_groups_equal_the_per_group_path(monkeypatch, case, whitening_kind):
    """All groups in one batched matmul give the per-group path's output, gradients and running
    statistics (float64, to rounding), forward and backward."""
    cls, shape, fmt = ONE_RUN[case]
    x = correlated(shape, fmt=fmt)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    results = []
    for together in (True, False):
        calls = _count_grouped_rows(monkeypatch)
        if not together:
            monkeypatch.setattr(cls, "_one_run_of_rows", lambda self, x: False)
        layer = make_layer(cls, 8, group_size=4, whitening=whitening_kind)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        grads = torch.autograd.grad(y, [xi, layer.weight, layer.bias], g)
        assert (len(calls) >= 2) == together  # forward and the Gram's backward at least
        results.append((y, *grads, layer.running_mean, layer.running_whitening))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert results[0][0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("whitening_kind", WHITENINGS)
def test_column_groups_gradcheck(monkeypatch, whitening_kind):
    calls = _count_grouped_rows(monkeypatch)
    layer = make_layer(DecorrelatedBatchNorm2d, 4, group_size=2, whitening=whitening_kind)
    x = correlated((3, 4, 2, 2), fmt=torch.channels_last).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(layer_fn(layer), (x, w, b))
    if whitening_kind == "iter":
        assert torch.autograd.gradgradcheck(layer_fn(layer), (x, w, b))
    assert calls
