"""Parity of bnlab.nn.BatchNorm{1,2,3}d with torch.nn.BatchNorm{1,2,3}d, and their edges."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab.nn as bnn
import bnlab.nn.batchnorm_fast as bnfast
import bnlab.nn.passes as passes
from bnlab.nn.batchnorm import _BatchNorm, batch_norm

PAIRS = {
    1: (bnn.BatchNorm1d, nn.BatchNorm1d),
    2: (bnn.BatchNorm2d, nn.BatchNorm2d),
    3: (bnn.BatchNorm3d, nn.BatchNorm3d),
}
# One representative input shape per accepted rank (BatchNorm1d takes (N,C) and (N,C,L)).
SHAPES = {
    "1d-NC": (1, (6, 3)),
    "1d-NCL": (1, (4, 3, 20)),
    "2d": (2, (4, 3, 5, 7)),
    "2d-rows": (2, (3, 3, 8, 8)),  # rows of 64: exercises the batched-dot fast path
    "3d": (3, (2, 3, 3, 4, 5)),
}


def make_pair(kind: int, num_features: int = 3, seed: int = 0, **kwargs):
    """A custom and a torch layer with identical, non-trivial parameters and buffers."""
    ours_cls, torch_cls = PAIRS[kind]
    ours, ref = ours_cls(num_features, **kwargs), torch_cls(num_features, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in ref.named_parameters():
            t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) + 0.5)
            getattr(ours, name).copy_(t)
        if ref.running_mean is not None:
            ref.running_mean.copy_(torch.randn(num_features, generator=gen))
            ref.running_var.copy_(torch.rand(num_features, generator=gen) + 0.5)
            ours.running_mean.copy_(ref.running_mean)
            ours.running_var.copy_(ref.running_var)
    return ours, ref


def grads_of(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    inputs = [x] + [p for p in (module.weight, module.bias) if p is not None]
    return y, torch.autograd.grad(y, inputs, g)


def assert_same_state(ours: nn.Module, ref: nn.Module, **tol) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, **tol, msg=name)


def check_step(ours, ref, x, **tol):
    """One forward+backward of both layers on the same input and upstream grad."""
    g = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=_fmt(x))
    y1, g1 = grads_of(ours, x, g)
    y2, g2 = grads_of(ref, x, g)
    torch.testing.assert_close(y1, y2, **tol)
    assert y1.dtype == y2.dtype
    assert_same_layout(y1, y2)
    for a, b, what in zip(g1, g2, ("input", "weight", "bias"), strict=False):
        torch.testing.assert_close(a, b, **tol, msg=f"grad {what}")
        assert a.dtype == b.dtype, what
        assert_same_layout(a, b)
    assert_same_state(ours, ref, **tol)


def assert_same_layout(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same strides; where size-1 dims make strides ambiguous, the same contiguity."""
    if all(s > 1 for s in a.shape):
        assert a.stride() == b.stride(), (a.stride(), b.stride())
    formats = [torch.contiguous_format]
    formats += {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(a.dim(), [])
    for fmt in formats:
        assert a.is_contiguous(memory_format=fmt) == b.is_contiguous(memory_format=fmt), fmt


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ------------------------------------------------------------------------------------------
# Parity: forward, grads, running statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-3},
        {"bias": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_parity_train_then_eval(shape_id, options):
    kind, shape = SHAPES[shape_id]
    torch.manual_seed(1)
    ours, ref = make_pair(kind, **options)
    for step in range(3):  # several steps: running statistics accumulate
        x = torch.randn(shape) * (step + 1) + step
        check_step(ours, ref, x)
    ours.eval()
    ref.eval()
    check_step(ours, ref, torch.randn(shape) * 2 - 1)


# |loc| / scale is bounded so that torch's own rounding (its float mean is off by up to
# ulp(loc)/2) stays inside the tolerance; huge means are tested separately below.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from([1, 2, 3]),
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.integers(1, 5),
    use_L=st.booleans(),
    affine=st.booleans(),
    track=st.booleans(),
    momentum=st.sampled_from([0.1, 0.5, 1.0, 0.0, None]),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    loc=st.floats(-10, 10),
    scale=st.floats(0.1, 100),
    train_steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_parity_property(
    kind, n, c, spatial, use_L, affine, track, momentum, eps, loc, scale, train_steps, seed
):
    torch.manual_seed(seed)
    ours, ref = make_pair(
        kind, c, seed=seed, affine=affine, track_running_stats=track, momentum=momentum, eps=eps
    )
    spatial_dims = (int(use_L) if kind == 1 else kind) * (spatial,)
    shape = (n, c, *spatial_dims)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    for _ in range(train_steps):
        check_step(ours, ref, torch.randn(shape) * scale + loc, **tol)
    ours.eval()
    ref.eval()
    check_step(ours, ref, torch.randn(shape) * scale + loc, **tol)


def test_running_stats_formula():
    """running = (1-m) running + m batch, with the unbiased variance."""
    m = bnn.BatchNorm1d(2, momentum=0.25)
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 30.0], [7.0, 40.0]])
    m(x)
    mean = x.mean(0)
    var_unbiased = x.var(0, correction=1)
    torch.testing.assert_close(m.running_mean, 0.25 * mean)
    torch.testing.assert_close(m.running_var, 0.75 * torch.ones(2) + 0.25 * var_unbiased)
    # ... and the output uses the biased variance
    y = m.train()(x)
    expected = (x - mean) / torch.sqrt(x.var(0, correction=0) + m.eps)
    torch.testing.assert_close(y, expected)


def test_cumulative_average_when_momentum_is_none():
    m = bnn.BatchNorm1d(3, momentum=None)
    batches = [torch.randn(8, 3) * (i + 1) + i for i in range(4)]
    for b in batches:
        m(b)
    torch.testing.assert_close(m.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(
        m.running_var, torch.stack([b.var(0, correction=1) for b in batches]).mean(0)
    )
    assert m.num_batches_tracked.item() == 4


def test_momentum_changed_after_construction():
    ours, ref = make_pair(2)
    for momentum in (0.1, None, 0.7, None, 0.0):
        ours.momentum = ref.momentum = momentum
        check_step(ours, ref, torch.randn(4, 3, 3, 3))


def test_repeated_train_eval_switching():
    ours, ref = make_pair(2, momentum=None)
    for i, mode in enumerate([True, False, True, True, False, False, True, False]):
        ours.train(mode)
        ref.train(mode)
        check_step(ours, ref, torch.randn(5, 3, 4, 4) * 3 + i)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    m = bnn.BatchNorm2d(3, track_running_stats=False).eval()
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    assert {"running_mean", "running_var", "num_batches_tracked"} <= set(m._buffers)
    x = torch.randn(4, 3, 2, 2) * 5 + 3
    y = m(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), correction=0), torch.ones(3), atol=1e-3, rtol=0)


def test_track_running_stats_toggled_after_construction():
    """Buffers present but tracking off: eval uses the buffers, training does not update."""
    ours, ref = make_pair(2)
    ours.track_running_stats = ref.track_running_stats = False
    for mode in (False, True, False):
        ours.train(mode)
        ref.train(mode)
        check_step(ours, ref, torch.randn(4, 3, 3, 3))
    assert ours.num_batches_tracked.item() == 0


# ------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape",
    [(4, 2), (3, 2, 3), (2, 2, 3, 2), (2, 2, 2, 2, 2), (2, 2, 4, 4)],
    ids=["NC", "NCL", "NCHW", "NCDHW", "NCHW-rows"],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradcheck_and_gradgradcheck(training, shape, affine):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_()
    inputs = [x]
    if affine:
        w = (torch.rand(c, dtype=torch.float64, generator=gen) + 0.5).requires_grad_()
        b = torch.randn(c, dtype=torch.float64, generator=gen).requires_grad_()
        inputs += [w, b]
    rm = torch.randn(c, dtype=torch.float64, generator=gen)
    rv = torch.rand(c, dtype=torch.float64, generator=gen) + 0.5

    def fn(x, w=None, b=None):
        # Running statistics are passed in eval mode only (in training they would be
        # updated at every gradcheck evaluation, which does not change the output anyway).
        return batch_norm(
            x, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-3
        )

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradcheck_channels_last():
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: batch_norm(x, None, None, w, b, True, 0.1, 1e-3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_double_backward_matches_torch():
    """Second derivatives (create_graph) agree with torch's, in train and eval mode."""
    for training in (True, False):
        ours, ref = make_pair(2)
        ours.double().train(training)
        ref.double().train(training)
        x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
        results = []
        for m in (ours, ref):
            xi = x.clone().requires_grad_()
            y = m(xi)
            (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
            results.append(torch.autograd.grad(gx.pow(2).sum(), [xi, m.weight, m.bias]))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------
# No native normalization kernel
# ------------------------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _raise(*args, **kwargs):
    raise AssertionError("a native batch-norm entry point was called")


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 8, 8), (2, 3, 2, 3, 4)])
def test_no_native_norm_kernel(monkeypatch, shape):
    # Entering a dispatch mode imports torch._dynamo, which keeps references to torch's
    # functions: imported while they are patched, it could not trace the real ones later in
    # this process. So it is imported before patching.
    import torch._dynamo

    for owner, name in [
        (torch, "batch_norm"),
        (torch, "native_batch_norm"),
        (torch, "_native_batch_norm_legit"),
        (torch, "_native_batch_norm_legit_no_training"),
        (torch, "cudnn_batch_norm"),
        (torch, "instance_norm"),
        (torch, "layer_norm"),
        (torch, "group_norm"),
        (F, "batch_norm"),
        (F, "instance_norm"),
        (F, "layer_norm"),
        (F, "group_norm"),
    ]:
        monkeypatch.setattr(owner, name, _raise)
    kind = len(shape) - 2 if len(shape) > 2 else 1
    layer = PAIRS[kind][0](3)
    with _RecordOps() as rec:
        for training in (True, False):
            layer.train(training)
            x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            layer.double()
            y = layer(x)
            (gx,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
            gx.sum().backward()  # double backward too
    assert rec.ops, "dispatch mode recorded nothing"
    norm_ops = [op for op in rec.ops if "norm" in op]
    assert norm_ops == [], norm_ops


def test_not_a_subclass_of_torch_batchnorm():
    for kind in (1, 2, 3):
        cls = PAIRS[kind][0]
        assert issubclass(cls, _BatchNorm) and issubclass(cls, nn.Module)
        assert not issubclass(cls, nn.modules.batchnorm._NormBase)


# ------------------------------------------------------------------------------------------
# Errors: same types, messages and timing as torch
# ------------------------------------------------------------------------------------------


def _outcome(fn):
    try:
        out = fn()
    except Exception as e:  # comparing whatever torch raises
        return type(e), str(e)
    return "ok", tuple(out.shape)


@pytest.mark.parametrize(
    ("kind", "bad_shape"),
    [(1, (3,)), (1, (2, 3, 4, 5)), (2, (2, 3, 4)), (2, (2, 3, 4, 5, 6)), (3, (2, 3, 4, 5))],
)
def test_wrong_input_dim(kind, bad_shape):
    ours, ref = make_pair(kind)
    x = torch.randn(bad_shape)
    got, want = _outcome(lambda: ours(x)), _outcome(lambda: ref(x))
    assert got == want
    assert got[0] is ValueError and "input (got" in got[1]
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 0


@pytest.mark.parametrize(
    ("kind", "shape"), [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)), (3, (1, 3, 1, 1, 1))]
)
@pytest.mark.parametrize("track", [True, False])
def test_one_value_per_channel(kind, shape, track):
    ours, ref = make_pair(kind, track_running_stats=track)
    x = torch.randn(shape)
    got, want = _outcome(lambda: ours(x)), _outcome(lambda: ref(x))
    assert got == want and got[0] is ValueError
    assert "Expected more than 1 value per channel when training" in got[1]
    assert_same_state(ours, ref)  # the counter advanced before the check, in both
    ours.eval()
    ref.eval()
    # Eval mode: fine with running stats; still an error when batch stats are needed.
    assert _outcome(lambda: ours(x)) == _outcome(lambda: ref(x))


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_non_positive_eps(eps, training, track):
    # Construction never raises (as in torch); the check happens at call time.
    ours, ref = make_pair(2, eps=eps, track_running_stats=track)
    ours.train(training)
    ref.train(training)
    x = torch.randn(3, 3, 2, 2)
    got, want = _outcome(lambda: ours(x)), _outcome(lambda: ref(x))
    assert got == want
    if training or not track or eps < 0:
        assert got[0] is ValueError and "batch_norm eps must be" in got[1]
    else:
        assert got[0] == "ok"  # eps=0 is allowed with running statistics
    assert_same_state(ours, ref)


def test_input_dtype_rules_match_torch():
    """All combinations of input / parameter / buffer dtypes: same success or same error."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
    for x_dtype in [*dtypes, torch.int64, torch.bool, torch.complex64]:
        for w_dtype in dtypes:
            for r_dtype in dtypes:
                for training in (True, False):
                    outcomes = []
                    for m in make_pair(1):
                        m.train(training)
                        m.weight.data = m.weight.data.to(w_dtype)
                        m.bias.data = m.bias.data.to(w_dtype)
                        m.running_mean = m.running_mean.to(r_dtype)
                        m.running_var = m.running_var.to(r_dtype)
                        x = (torch.randn(4, 3) * 3).to(x_dtype)
                        outcomes.append(_outcome(lambda m=m, x=x: m(x)))
                    assert outcomes[0] == outcomes[1], (x_dtype, w_dtype, r_dtype, training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "options", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}]
)
def test_wrong_number_of_channels(training, options):
    ours, ref = make_pair(2, **options)
    ours.train(training)
    ref.train(training)
    x = torch.randn(2, 5, 3, 3)
    assert _outcome(lambda: ours(x)) == _outcome(lambda: ref(x))


def test_missing_running_stat_in_eval():
    for name in ("running_mean", "running_var"):
        ours, ref = make_pair(1)
        for m in (ours, ref):
            setattr(m, name, None)
            m.eval()
        x = torch.randn(4, 3)
        got = _outcome(lambda: ours(x))  # noqa: B023
        assert got == _outcome(lambda: ref(x))  # noqa: B023
        assert got[0] is RuntimeError and "must be defined in evaluation mode" in got[1]
    # Both None in eval: batch statistics, as in torch.
    ours, ref = make_pair(1)
    for m in (ours, ref):
        m.running_mean = m.running_var = None
        m.eval()
    check_step(ours, ref, torch.randn(4, 3))


# ------------------------------------------------------------------------------------------
# Edge inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "shape"),
    [(1, (0, 3)), (1, (0, 3, 4)), (2, (0, 3, 4, 4)), (2, (2, 3, 0, 4)), (3, (0, 3, 2, 2, 2))],
)
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(kind, shape, training):
    ours, ref = make_pair(kind)
    ours.train(training)
    ref.train(training)
    before = ours.running_mean.clone(), ours.running_var.clone()
    check_step(ours, ref, torch.randn(shape))
    # no statistics from an empty batch; the counter still advances in training (as torch)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert ours.num_batches_tracked.item() == int(training)
    _, grads = grads_of(ours, torch.randn(shape), torch.randn(shape))
    assert grads[1] is not None and torch.equal(grads[1], torch.zeros(3))


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_huge_mean_is_numerically_stable(offset):
    """|mean| >> std: float32 results match the exact (float64) math on the same input.

    torch's own CPU kernel is less accurate here (its float32 mean carries an error of about
    ulp(mean)), so against torch the outputs get a tolerance of a few ulp(offset) and the
    gradients (whose error in torch grows with sum |g| * ulp(mean)) are checked against
    float64 only.
    """
    torch.manual_seed(0)
    ulp = torch.finfo(torch.float32).eps * offset
    ours, ref = make_pair(2)
    ours64, _ = make_pair(2)
    ours64.double()
    x = torch.randn(8, 3, 6, 6) + offset
    g = torch.randn(x.shape)
    y, grads = grads_of(ours, x, g)
    y_ref, _ = grads_of(ref, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=4 * ulp)
    assert_same_state(ours, ref, rtol=1e-3, atol=1e-3)
    y64, grads64 = grads_of(ours64.train(), x.double(), g.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads64, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    # The naive E[x^2] - E[x]^2 gives a variance of 0 or garbage here.
    assert 0.5 < y.std().item() < 2.0

    # Eval mode with a huge running mean: (x - running_mean) is formed before scaling.
    for m in (ours, ours64):
        m.eval()
        with torch.no_grad():
            m.running_mean.fill_(offset)
            m.running_var.fill_(1.0)
    y, grads = grads_of(ours, x, g)
    y64, grads64 = grads_of(ours64, x.double(), g.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads64, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def _force_slices(monkeypatch, samples_per_slice: int, bytes_per_sample: int) -> list[int]:
    """Make the eager layer walk small inputs a few samples at a time, as it walks large ones
    (``_SLICE_BYTES``); returns the slice counts of every walk of the fast path, to show the
    slices were used."""
    monkeypatch.setattr(passes, "_SLICE_BYTES", samples_per_slice * bytes_per_sample)
    counts: list[int] = []
    real = passes.sample_slices

    def spy(t, align=1):
        slices = real(t, align)
        counts.append(len(slices))
        return slices

    monkeypatch.setattr(bnfast, "sample_slices", spy)
    return counts


@pytest.mark.parametrize("per_slice", [1, 2], ids=["1-sample", "2-samples"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_sample_slices_match_torch(monkeypatch, per_slice, layout):
    """Walking the batch in slices (9 samples: 9 slices, or 5 with a short last one) gives the
    same outputs, gradients and running statistics as torch, in training and in eval."""
    x = torch.randn(9, 3, 6, 12) * 3 + 1
    x = {
        "nchw": x[..., :6].contiguous(),
        "nhwc": x[..., :6].contiguous(memory_format=torch.channels_last),
        "strided": x[..., ::2],
    }[layout]
    counts = _force_slices(monkeypatch, per_slice, 3 * 6 * 6 * 4)
    ours, ref = make_pair(2)
    for _ in range(2):
        check_step(ours, ref, x)
    expected = -(-9 // per_slice)
    assert counts.count(expected) >= 2 * 3  # forward, gradient sums, dx; two steps
    ours.eval()
    ref.eval()
    counts.clear()
    check_step(ours, ref, x * 2 - 1)
    assert expected in counts  # the weight gradient's dot product


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sample_slices_other_dtypes(monkeypatch, dtype):
    """Slices with float64, and with bfloat16 inputs computed in float32 buffers."""
    x = (torch.randn(9, 3, 6, 6) * 2 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    counts = _force_slices(monkeypatch, 2, 3 * 6 * 6 * torch.finfo(dtype).bits // 8)
    ours, ref = make_pair(2)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    if dtype == torch.float64:
        ours.double()
        ref.double()
    for _ in range(2):
        check_step(ours, ref, x, **tol)
    assert max(counts) > 1


def test_sample_slices_huge_mean(monkeypatch):
    """The centred path (|mean| >> std) in slices still equals the float64 math."""
    _force_slices(monkeypatch, 2, 3 * 6 * 6 * 4)
    ours, _ = make_pair(2)
    ours64, _ = make_pair(2)
    ours64.double()
    x = torch.randn(9, 3, 6, 6) + 1e5
    g = torch.randn(x.shape)
    y, grads = grads_of(ours, x, g)
    y64, grads64 = grads_of(ours64, x.double(), g.double())
    torch.testing.assert_close(y, y64.float(), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads64, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("training", [True, False])
def test_half_inputs(x_dtype, param_dtype, training):
    ours, ref = make_pair(2)
    if param_dtype == "same":
        ours.to(x_dtype)
        ref.to(x_dtype)
    ours.train(training)
    ref.train(training)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(x_dtype)
    tol = {"rtol": 2e-2, "atol": 2e-2}
    for _ in range(2):
        check_step(ours, ref, x, **tol)
    assert ours.weight.dtype == (x_dtype if param_dtype == "same" else torch.float32)


def test_float64():
    ours, ref = make_pair(3)
    ours.double()
    ref.double()
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        check_step(ours, ref, torch.randn(2, 3, 3, 4, 5, dtype=torch.float64) * 4 + 2)


def _layouts():
    base4 = torch.randn(4, 3, 6, 6)
    base5 = torch.randn(2, 3, 3, 4, 4)
    return {
        "channels_last": (2, base4.to(memory_format=torch.channels_last)),
        "channels_last_3d": (3, base5.to(memory_format=torch.channels_last_3d)),
        "channels_last_sliced": (2, base4.to(memory_format=torch.channels_last)[..., ::2]),
        "sliced": (2, base4[:, :, ::2, 1:]),
        "permuted": (2, torch.randn(4, 6, 6, 3).permute(0, 3, 1, 2).transpose(2, 3)),
        "transposed_NC": (1, torch.randn(3, 5).t()),
        "NCL_permuted": (1, torch.randn(5, 4, 3).permute(1, 2, 0)),
        "expanded": (2, torch.randn(1, 3, 4, 4).expand(4, 3, 4, 4)),
        "channels_last_1x1": (2, torch.randn(4, 3, 1, 1).to(memory_format=torch.channels_last)),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("training", [True, False])
def test_memory_layouts(layout, training):
    """Non-contiguous and channels_last inputs: same values and same output/grad strides."""
    kind, x = _layouts()[layout]
    ours, ref = make_pair(kind)
    ours.train(training)
    ref.train(training)
    check_step(ours, ref, x)
    if layout.startswith("channels_last") and layout != "channels_last_1x1":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
        y, (gx, *_) = grads_of(ours, x, torch.randn_like(x))
        assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


def test_sum_backward_expanded_grad():
    """y.sum().backward() hands the layer a stride-0 grad."""
    for training in (True, False):
        ours, ref = make_pair(2)
        ours.train(training)
        ref.train(training)
        xs = [torch.randn(4, 3, 8, 8).requires_grad_() for _ in range(2)]
        xs[1].data.copy_(xs[0].data)
        ours(xs[0]).sum().backward()
        ref(xs[1]).sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_meta_device_and_to():
    m = bnn.BatchNorm2d(4, device="meta")
    assert m.weight.device.type == "meta"
    assert m(torch.empty(2, 4, 3, 3, device="meta")).shape == (2, 4, 3, 3)
    m = bnn.BatchNorm2d(4).to(torch.float64)
    assert m.running_var.dtype == torch.float64 and m.num_batches_tracked.dtype == torch.long


@pytest.mark.slow
def test_torch_compile_aot_eager():
    """dynamo traces the custom autograd.Function without graph breaks; results match torch."""
    ours, ref = make_pair(2)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for training in (True, False, True):
        ours.train(training)
        ref.train(training)
        x = torch.randn(4, 3, 5, 5)
        g = torch.randn(4, 3, 5, 5)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ga = torch.autograd.grad(compiled(xa), [xa, ours.weight, ours.bias], g)
        gb = torch.autograd.grad(ref(xb), [xb, ref.weight, ref.bias], g)
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b)
        assert_same_state(ours, ref)


# ------------------------------------------------------------------------------------------
# Module plumbing: constructor, repr, copy, pickle, state dicts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"eps": 1e-3, "momentum": None},
        {"affine": False, "track_running_stats": False},
        {"bias": False, "momentum": 0.5},
        {"dtype": torch.float64},
    ],
)
def test_constructor_state_and_repr(kind, options):
    ours, ref = PAIRS[kind][0](7, **options), PAIRS[kind][1](7, **options)
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]
    assert ours.extra_repr() == ref.extra_repr()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours._buffers) == list(ref._buffers)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for k in sd_ref:
        assert torch.equal(sd_ours[k], sd_ref[k]) and sd_ours[k].dtype == sd_ref[k].dtype, k
    assert sd_ours._metadata[""]["version"] == sd_ref._metadata[""]["version"] == 2
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr)


def test_reset_parameters_and_running_stats():
    m = bnn.BatchNorm2d(3)
    with torch.no_grad():
        m.weight.fill_(3)
        m.bias.fill_(2)
    m(torch.randn(4, 3, 2, 2) + 5)
    m.reset_running_stats()
    assert torch.equal(m.running_mean, torch.zeros(3))
    assert torch.equal(m.running_var, torch.ones(3))
    assert m.num_batches_tracked.item() == 0
    assert torch.equal(m.weight, torch.full((3,), 3.0))
    m(torch.randn(4, 3, 2, 2) + 5)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))
    assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_mean, torch.zeros(3))
    bnn.BatchNorm2d(3, affine=False, track_running_stats=False).reset_parameters()  # no-op


def test_deepcopy_and_pickle():
    m, _ = make_pair(2)
    m(torch.randn(4, 3, 3, 3))
    x = torch.randn(4, 3, 3, 3)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    saved = copy.deepcopy(m.state_dict())
    for clone in (
        copy.deepcopy(m),
        pickle.loads(pickle.dumps(m)),
        torch.load(buf, weights_only=False),
    ):
        m.load_state_dict(saved)  # undo the previous round's training step
        assert type(clone) is bnn.BatchNorm2d
        assert clone.weight is not m.weight
        for mode in (False, True):
            clone.train(mode)
            m.train(mode)
            torch.testing.assert_close(clone(x), m(x))
        assert_same_state(clone, m)
        clone(x)  # independent buffers
        assert clone.num_batches_tracked.item() == m.num_batches_tracked.item() + 1


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, {"affine": False}, {"bias": False}, {"momentum": None}])
@pytest.mark.parametrize("direction", ["torch->custom", "custom->torch"])
def test_state_dict_round_trip(kind, options, direction):
    ours, ref = make_pair(kind, **options)
    if direction == "torch->custom":
        src, dst = ref, PAIRS[kind][0](3, **options)
    else:
        src, dst = ours, PAIRS[kind][1](3, **options)
    shape = (4, 3) + (3,) * (kind if kind > 1 else 0)
    src(torch.randn(shape))  # non-trivial running stats and counter
    src(torch.randn(shape))
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.num_batches_tracked.item() == 2
    for training in (False, True):
        src.train(training)
        dst.train(training)
        x = torch.randn(shape)
        torch.testing.assert_close(dst(x), src(x))


@pytest.mark.parametrize("direction", ["torch->custom", "custom->torch"])
def test_old_checkpoint_without_num_batches_tracked(direction):
    """Checkpoints from before num_batches_tracked existed (state-dict version 1) load."""
    ours, ref = make_pair(2)
    if direction == "torch->custom":
        src, dst_cls = ref, bnn.BatchNorm2d
    else:
        src, dst_cls = ours, nn.BatchNorm2d
    old = src.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    dst = dst_cls(3)
    dst.load_state_dict(old, strict=True)
    assert dst.num_batches_tracked.item() == 0
    torch.testing.assert_close(dst.running_var, src.running_var)

    # No metadata at all (a plain dict) is treated as an old checkpoint too.
    plain = {k: v for k, v in old.items()}
    dst_cls(3).load_state_dict(plain, strict=True)

    # Inside a bigger model, the prefix is honoured.
    model = nn.Sequential(nn.Identity(), dst_cls(3))
    nested = src.state_dict()
    nested = {f"1.{k}": v for k, v in nested.items() if k != "num_batches_tracked"}
    model.load_state_dict(nested, strict=True)

    # A version-2 checkpoint missing the key is an error, as in torch.
    new = src.state_dict()
    del new["num_batches_tracked"]
    for cls in (bnn.BatchNorm2d, nn.BatchNorm2d):
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            cls(3).load_state_dict(new, strict=True)


@pytest.mark.parametrize("direction", ["torch->custom", "custom->torch"])
def test_load_state_dict_assign(direction):
    ours, ref = make_pair(2)
    if direction == "torch->custom":
        src, dst = ref, bnn.BatchNorm2d(3, device="meta")
    else:
        src, dst = ours, nn.BatchNorm2d(3, device="meta")
    src(torch.randn(4, 3, 3, 3))
    sd = src.state_dict()
    dst.load_state_dict(sd, strict=True, assign=True)
    assert dst.weight.device.type == "cpu" and isinstance(dst.weight, nn.Parameter)
    assert dst.running_mean is sd["running_mean"]
    x = torch.randn(4, 3, 3, 3)
    for training in (False, True):
        src.train(training)
        dst.train(training)
        torch.testing.assert_close(dst(x), src(x))
    # old checkpoint + assign
    old = ref.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    m = bnn.BatchNorm2d(3)
    m.load_state_dict(old, strict=True, assign=True)
    assert m.num_batches_tracked.item() == 0
    _, grads = grads_of(m, x, torch.randn_like(x))
    assert all(g is not None for g in grads)
