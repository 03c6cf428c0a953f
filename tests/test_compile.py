"""``compile=true``: a compiled model with bnlab's own BatchNorm matches eager.

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

from bnlab.models import build_model, norm_factory


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
