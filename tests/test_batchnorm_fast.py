"""The eager fast path (bnlab.nn.batchnorm_fast) against the reference (bnlab.nn.batchnorm).

Each comparison runs two copies of one layer on the same input and upstream gradient: one
through the fast path (``fast=True``, the default), one with ``fast=False``, which runs the
reference Functions. Which Function ran is read off the output's ``grad_fn``, and spies show
which of the fast path's branches ran (sample slices, the well-conditioned shortcut, the
corrected two-pass). With the fast path off the layer must still equal torch's, and
``torch.compile`` must trace the reference. The fast path's statistics equal the one
definition, ``bnlab.nn.functional.batch_stats``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.nn.batchnorm as bnbn
import bnlab.nn.batchnorm_fast as bnfast
from bnlab.nn.functional import batch_stats
from tests.test_batchnorm import (
    PAIRS,
    SHAPES,
    _force_slices,
    _layouts,
    assert_same_layout,
    assert_same_state,
    check_step,
    make_pair,
)

FAST = {bnfast.FastTrainFn._backward_cls, bnfast.FastEvalFn._backward_cls}
REFERENCE = {bnbn._BatchNormTrainFn._backward_cls, bnbn._BatchNormEvalFn._backward_cls}
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


def run(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, *, fast: bool):
    """Forward + backward of ``layer`` through the fast path or the reference; returns the
    output, the grads of input/weight/bias and the output's grad_fn (the Function's ctx)."""
    x = x.detach().clone().requires_grad_()
    layer.fast = fast
    y = layer(x)
    assert type(y.grad_fn) in (FAST if fast else REFERENCE), type(y.grad_fn)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return y, torch.autograd.grad(y, [x, *params], g), y.grad_fn


def fast_vs_reference(layer: nn.Module, x: torch.Tensor, steps: int = 2, **tol):
    """``steps`` forward+backward steps of ``layer`` (fast) and of a copy (reference): same
    outputs, grads, dtypes, strides and running statistics. Returns the fast steps' ctxs."""
    tol = tol or TOL[x.dtype]
    reference = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(3)
    ctxs = []
    for _ in range(steps):
        g = torch.randn(x.shape, generator=gen).to(x.dtype)
        y1, grads1, ctx = run(layer, x, g, fast=True)
        y2, grads2, _ = run(reference, x, g, fast=False)
        for a, b, what in zip((y1, *grads1), (y2, *grads2), ("y", "x", "w", "b"), strict=False):
            torch.testing.assert_close(a, b, **tol, msg=what)
            assert a.dtype == b.dtype, what
            assert_same_layout(a, b)
        assert_same_state(layer, reference, **tol)
        ctxs.append(ctx)
    return ctxs


def spy_conditioning(monkeypatch) -> list[bool]:
    """Record every answer of the well-conditioned check (True: the cheaper formulas)."""
    answers: list[bool] = []
    real = bnfast._is_well_conditioned

    def spy(*args):
        answers.append(real(*args))
        return answers[-1]

    monkeypatch.setattr(bnfast, "_is_well_conditioned", spy)
    return answers


def input_2d(dtype: torch.dtype, layout: str, loc: float = 1.0) -> torch.Tensor:
    x = torch.randn(9, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return (x * 3 + loc).to(dtype).contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------------------
# The fast path equals the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_equals_reference(monkeypatch, dtype, layout, sliced, training):
    """Well-conditioned input (|mean| < 16 std): forward, grads and running statistics, with
    the tensor walked whole or two samples at a time (9 samples: 5 slices)."""
    x = input_2d(dtype, layout)
    bytes_per_sample = x[0].numel() * x.element_size()
    counts = _force_slices(monkeypatch, 2 if sliced else 9, bytes_per_sample)
    answers = spy_conditioning(monkeypatch)
    layer, _ = make_pair(2)
    layer.to(dtype).train(training)
    ctxs = fast_vs_reference(layer, x)
    assert counts and set(counts) == ({5} if sliced else {1}), counts
    if training:
        assert answers == [True, True] and all(ctx.shortcut for ctx in ctxs)


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False}, {"bias": False}, {"track_running_stats": False}, {"momentum": None}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_equals_reference_ranks_and_options(shape_id, options, training):
    kind, shape = SHAPES[shape_id]
    layer, _ = make_pair(kind, **options)
    layer.train(training)
    fast_vs_reference(layer, torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2)


@pytest.mark.parametrize("layout", list(_layouts()))
def test_fast_equals_reference_memory_layouts(layout):
    kind, x = _layouts()[layout]
    layer, _ = make_pair(kind)
    fast_vs_reference(layer, x)


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("loc", [60.0, 1e5], ids=["20-std", "1e5"])
def test_corrected_two_pass(monkeypatch, sliced, layout, loc):
    """|mean| >> std takes the corrected two-pass forward and the centred backward. The
    float32 fast path equals the reference computed in float64 on the same values (the float32
    reference carries torch's error of about ulp(mean) in its mean), and in float64 the fast
    path equals the reference to rounding."""
    x = input_2d(torch.float32, layout, loc)  # std 3: loc=60 is 20 std, just past the limit
    _force_slices(monkeypatch, 2 if sliced else 9, x[0].numel() * 4)
    answers = spy_conditioning(monkeypatch)
    layer, _ = make_pair(2)
    layer64 = copy.deepcopy(layer).double()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    y, grads, ctx = run(layer, x, g, fast=True)
    assert answers == [False] and not ctx.shortcut
    y64, grads64, _ = run(layer64, x.double(), g.double(), fast=False)
    for a, b in zip((y, *grads), (y64, *grads64), strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
    assert_same_state(layer, layer64.float(), rtol=1e-6, atol=1e-4)

    fresh, _ = make_pair(2)
    assert fast_vs_reference(fresh.double(), x.double(), steps=1)[0].shortcut is False


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_equals_reference_half_inputs(monkeypatch, x_dtype, param_dtype, training):
    """Half inputs are computed in float32 buffers (also when sliced); no shortcut for them."""
    x = input_2d(x_dtype, "nhwc")
    counts = _force_slices(monkeypatch, 2, x[0].numel() * 4)  # float32 slices of 2 samples
    layer, _ = make_pair(2)
    layer.to(x_dtype if param_dtype == "same" else torch.float32).train(training)
    ctxs = fast_vs_reference(layer, x)
    assert 5 in counts
    if training:
        assert not any(ctx.shortcut for ctx in ctxs)


def test_double_backward_fast_equals_reference():
    """create_graph=True after a fast forward: differentiable grads, equal to the reference's."""
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64) * 2 + 1
    for training in (True, False):
        results = []
        for fast in (True, False):
            layer, _ = make_pair(2)
            layer.fast = fast
            layer.double().train(training)
            xi = x.clone().requires_grad_()
            y = layer(xi)
            assert type(y.grad_fn) in (FAST if fast else REFERENCE)
            (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
            results.append(torch.autograd.grad(gx.pow(2).sum(), [xi, layer.weight, layer.bias]))
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float64])


# ------------------------------------------------------------------------------------------
# Switched off (fast=False): the reference alone, still equal to torch
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fast_path_unused(monkeypatch):
    """Fails the test if any of the fast path's passes runs."""
    counts = _force_slices(monkeypatch, 1, 1)
    yield
    assert counts == []


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize(
    "options",
    [{}, {"affine": False, "track_running_stats": False}, {"bias": False, "momentum": None}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_disabled_matches_torch(fast_path_unused, shape_id, options):
    kind, shape = SHAPES[shape_id]
    ours, ref = make_pair(kind, **options)
    ours.fast = False
    for step in range(3):
        check_step(ours, ref, torch.randn(shape) * (step + 1) + step)
    ours.eval()
    ref.eval()
    check_step(ours, ref, torch.randn(shape) * 2 - 1)


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_disabled_matches_torch_layouts(fast_path_unused, layout, training):
    kind, x = _layouts()[layout]
    ours, ref = make_pair(kind)
    ours.train(training)
    ref.train(training)
    ours.fast = False
    check_step(ours, ref, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_disabled_matches_torch_dtypes(fast_path_unused, dtype, training):
    ours, ref = make_pair(3)
    ours.to(dtype).train(training)
    ref.to(dtype).train(training)
    x = (torch.randn(2, 3, 3, 4, 5, dtype=torch.float64) * 4 + 2).to(dtype)
    ours.fast = False
    check_step(ours, ref, x, **({} if dtype == torch.float64 else TOL[torch.bfloat16]))


def test_fast_switch():
    """``fast`` is a constructor keyword (default True) read at each forward; a backward runs
    the implementation its forward chose; the functional form takes it too."""
    assert PAIRS[2][0](3).fast and not PAIRS[2][0](3, fast=False).fast
    layer = PAIRS[2][0](3, fast=False)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn) in REFERENCE
    layer.fast = True
    assert type(layer(x).grad_fn) in FAST
    y.sum().backward()  # the reference's backward, after the switch
    assert type(y.grad_fn) in REFERENCE and x.grad is not None
    for fast, kinds in ((True, FAST), (False, REFERENCE)):
        for training in (True, False):
            out = bnbn.batch_norm(x, torch.zeros(3), torch.ones(3), training=training, fast=fast)
            assert type(out.grad_fn) in kinds


@pytest.mark.slow
def test_torch_compile_traces_the_reference(monkeypatch):
    """Under torch.compile the fast Functions are never reached, even with fast=True."""
    calls = []

    def spied(fn_cls):
        class Spy(fn_cls):
            @staticmethod
            def forward(ctx, *args):
                calls.append(fn_cls.__name__)
                return fn_cls.forward(ctx, *args)

        return Spy

    monkeypatch.setattr(bnbn, "FastTrainFn", spied(bnfast.FastTrainFn))
    monkeypatch.setattr(bnbn, "FastEvalFn", spied(bnfast.FastEvalFn))
    ours, ref = make_pair(2)
    assert ours.fast
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    try:
        x = torch.randn(4, 3, 5, 5)
        for training in (True, False):
            ours.train(training)
            ref.train(training)
            check_step(compiled, ref, x)
    finally:
        torch._dynamo.reset()
    assert calls == []
    ours(x)  # the spy is live in eager mode
    assert calls == ["FastEvalFn"]


# ------------------------------------------------------------------------------------------
# The fast path's statistics against the one definition (functional.batch_stats)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
def test_fast_statistics_equal_batch_stats(monkeypatch, dtype, layout, sliced):
    """The per-channel mean and biased variance of the fast paths (the train Function's, and
    Batch Renorm's batch_stats_fast) equal batch_stats, also where |mean| >> std."""
    for loc in (1.0, 1e3):
        x = input_2d(torch.float64, "nchw", loc)
        x = {"nchw": x, "nhwc": x.contiguous(memory_format=torch.channels_last),
             "strided": torch.cat([x, x], -1)[..., ::2]}[layout].to(dtype)
        counts = _force_slices(monkeypatch, 2 if sliced else 9, x[0].numel() * x.element_size())
        mean, var = batch_stats(x)
        tol = TOL[dtype]
        fast_mean, fast_var = bnfast.batch_stats_fast(x)
        weight = torch.ones(3, dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
        _, fn_mean, fn_var = bnfast.FastTrainFn.apply(x, weight, None, 1e-5)
        for m, v in ((fast_mean, fast_var), (fn_mean, fn_var)):
            assert m.dtype == mean.dtype and v.dtype == var.dtype
            torch.testing.assert_close(m, mean, **tol)
            torch.testing.assert_close(v, var, **tol)
        assert (max(counts) > 1) if sliced else set(counts) == {1}, counts
