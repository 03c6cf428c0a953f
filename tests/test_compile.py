"""``compile=true``: a compiled model with bnlab's own BatchNorm matches eager, and max-pooling
is left to ATen's kernels on CPU.

One representative case (a tiny ``cnn`` with ``norm=custom``): compiling takes tens of seconds
per model on this CPU even when tiny, so the other models and norms, Inductor code generation
and the speed-up are checked by ``scripts/bench_compile.py``. Here the ``aot_eager`` backend runs
the same Dynamo capture and AOT-autograd tracing of the custom autograd Functions as Inductor
(where compile-only bugs show: graph breaks, running-statistics updates, the backward), without
the C++ compile that would make a cold-cache test take minutes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models import build_model, norm_factory
from bnlab.nn import MaxPool2d, NoisyBatchNorm2d
from bnlab.nn.pooling import _max_pool2d, _max_pool2d_backward
from bnlab.runtime import compile_model


@pytest.fixture
def models():
    torch.manual_seed(0)
    eager = build_model("cnn", norm_factory("custom"), init="kaiming", channels=[4, 8], hidden=16)
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    yield eager, compiled_model, torch.compile(compiled_model, backend="aot_eager")
    torch._dynamo.reset()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_custom_bn_model_matches_eager(models):
    eager, compiled_model, compiled = models
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    for _ in range(2):  # two steps: the second sees updated weights and running statistics
        outs = []
        for model, forward in ((eager, eager), (compiled_model, compiled)):
            out = forward(x)
            loss = F.cross_entropy(out, y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
            outs.append([out, *(p.grad for p in model.parameters()), *model.buffers()])
        for a, b in zip(*outs, strict=True):
            close(a, b)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        close(eager(x), compiled(x))


POOL_ARGS = ([2, 2], [2, 2], [0, 0], [1, 1], False)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pooling_ops_registrations(fmt):
    """torch.library.opcheck: schema, fake (meta) shapes and strides against the real kernel,
    autograd registration, and tracing through AOT autograd."""
    x = torch.randn(2, 3, 6, 8).contiguous(memory_format=fmt).requires_grad_()
    torch.library.opcheck(_max_pool2d, (x, *POOL_ARGS))
    out, indices = _max_pool2d(x.detach(), *POOL_ARGS)
    grad = torch.randn_like(out)
    torch.library.opcheck(_max_pool2d_backward, (grad, x.detach(), indices, *POOL_ARGS))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pooling_op_equals_torch_max_pool(fmt):
    x = torch.randn(2, 3, 7, 8).contiguous(memory_format=fmt).requires_grad_()
    pool = nn.MaxPool2d(2, ceil_mode=True)
    args = ([2, 2], [2, 2], [0, 0], [1, 1], True)
    ours, ref = _max_pool2d(x, *args)[0], pool(x)
    assert torch.equal(ours, ref) and ours.stride() == ref.stride()
    g = torch.randn_like(ref)
    (gx_ours,), (gx_ref,) = torch.autograd.grad(ours, x, g), torch.autograd.grad(ref, x, g)
    assert torch.equal(gx_ours, gx_ref) and gx_ours.stride() == gx_ref.stride()


@pytest.mark.parametrize("norm", ["custom", "torch", "none"])
def test_cpu_compile_calls_aten_pooling_in_one_graph(norm):
    """Under compile on CPU the model is one graph and its pools call the custom op (ATen's
    kernel), not a pooling op that Inductor would generate code for."""
    torch.manual_seed(0)
    model = build_model("cnn", norm_factory(norm), init="kaiming", channels=[4, 8], hidden=16)
    assert all(type(m) is MaxPool2d for m in model.modules() if isinstance(m, nn.MaxPool2d))
    graphs: list[list[str]] = []  # the call targets of each captured graph

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    try:
        x = torch.randn(2, 3, 32, 32)
        close(model(x), torch.compile(model, backend=recording_backend)(x))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    pooling = [t for t in graphs[0] if "pool" in t]
    assert pooling == ["bnlab.max_pool2d.default"] * 2, pooling


@pytest.mark.slow
def test_cpu_compile_draws_eager_random_numbers():
    """``compile_model`` on CPU (Inductor, as ``bnlab train compile=true``) takes random numbers
    from ATen's generator, so with the same seed a compiled noisy layer adds eager's noise and
    dropout drops eager's units."""
    layer = nn.Sequential(NoisyBatchNorm2d(3), nn.Dropout(0.5))
    x = torch.randn(4, 3, 5, 5)
    torch._dynamo.reset()
    try:
        compiled = compile_model(layer, torch.device("cpu"))
        # (with autograd on, as in training: the compiled forward is AOT's training graph)
        torch.manual_seed(7)
        expected = layer(x)
        torch.manual_seed(8)
        other = layer(x)
        torch.manual_seed(7)
        got = compiled(x)
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(expected, other)  # the output depends on the draws
    close(expected, got)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_compiled_batch_stats_equal_the_two_pass_form(layout):
    """Under torch.compile the per-channel statistics are traced as one var_mean (a single
    reduction) and equal the eager two-pass form: float64 to rounding, float32 to its
    precision also where |mean| >> std."""
    from bnlab.nn.functional import batch_stats

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(batch_stats, backend=recording_backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        for dtype, loc, tol in ((torch.float64, 1.0, 1e-12), (torch.float32, 1e3, 1e-5)):
            x = torch.randn(6, 3, 5, 4, dtype=torch.float64) * 3 + loc
            if layout == "nhwc":
                x = x.contiguous(memory_format=torch.channels_last)
            x = x.to(dtype)
            for got, want in zip(compiled(x), batch_stats(x), strict=True):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    finally:
        torch._dynamo.reset()
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert any("var_mean" in op for op in ops), ops
