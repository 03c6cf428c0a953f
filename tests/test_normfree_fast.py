"""The eager fast path of FRN and EvoNorm (``bnlab.nn.normfree_fast``) against the references
(``fast=False``): the same outputs, gradients and running variance, in float64, on every input
form; which path runs; and what the fast path must not change (no view output, ties, double
backward). The references themselves are checked against the papers' oracles in
``tests/test_normfree.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import bnlab.nn.normfree_fast as normfree_fast
import bnlab.nn.passes as passes
from bnlab.nn import EvoNormB0, EvoNormS0, FilterResponseNorm

F64 = torch.float64
LAYERS = {
    "frn": lambda c: FilterResponseNorm(c, dtype=F64),
    "frn_learned_eps": lambda c: FilterResponseNorm(c, learnable_eps=True, eps_init=0.2,
                                                    dtype=F64),
    "evonorm_b0": lambda c: EvoNormB0(c, momentum=0.3, dtype=F64),
    "evonorm_s0": lambda c: EvoNormS0(c, groups=2, dtype=F64),
}
BACKWARDS = {"frn": "FilterResponseNormFn", "frn_learned_eps": "FilterResponseNormFn",
             "evonorm_b0": "EvoNormB0TrainFn", "evonorm_s0": "EvoNormS0Fn"}
# (N, C, *) forms: conv maps in both layouts, a 1×1 map, the hidden linear (N, C), (N, C, L)
INPUTS = [((6, 4, 3, 5), False), ((6, 4, 3, 5), True), ((6, 4, 1, 1), False), ((6, 4), False),
          ((6, 4, 7), False)]


@pytest.fixture(params=["whole", "sliced"])
def slice_counts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Walk the tensors whole, or 4 samples at a time (6 samples: slices of 4 and 2), as the fast
    path walks large CPU tensors; returns the slice counts of every walk."""
    counts: list[int] = []
    if request.param == "sliced":
        monkeypatch.setattr(passes, "_MIN_SLICES", 1)
        real = passes.sample_slices

        def spy(t: Tensor, align: int = 1) -> list[slice]:
            monkeypatch.setattr(passes, "_SLICE_BYTES", 4 * t[0].numel() * t.element_size())
            slices = real(t, align)
            counts.append(len(slices))
            return slices

        monkeypatch.setattr(normfree_fast, "sample_slices", spy)
    return counts


def _pair(name: str, c: int) -> tuple[nn.Module, nn.Module]:
    """The layer with random parameters, and a copy that takes the reference path."""
    torch.manual_seed(0)
    fast = LAYERS[name](c)
    with torch.no_grad():
        for pname, p in fast.named_parameters():
            if pname != "learned_eps":
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if pname == "weight" else 0.0))
    reference = copy.deepcopy(fast)
    reference.fast = False
    return fast, reference


def _grads(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    x = x.detach().requires_grad_()
    y = layer(x)
    return y, torch.autograd.grad(y, [x, *layer.parameters()], g)


@pytest.mark.parametrize(("shape", "channels_last"), INPUTS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_fast_path_equals_the_reference(name: str, shape: tuple[int, ...], channels_last: bool,
                                        slice_counts: list[int]) -> None:
    fast, reference = _pair(name, shape[1])
    for step in range(2):  # B0: the running variance moves between the steps
        x = (torch.randn(shape, dtype=F64) * 2 + 0.5) * (step + 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, dtype=F64)
        (y, grads), (y_ref, grads_ref) = _grads(fast, x, g), _grads(reference, x, g)
        assert y.grad_fn is not None and BACKWARDS[name] in type(y.grad_fn).__name__
        assert BACKWARDS[name] not in type(y_ref.grad_fn).__name__
        torch.testing.assert_close(y, y_ref)
        assert y.stride() == y_ref.stride()
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b)
        assert grads[0].stride() == x.stride()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(fast.state_dict()[key], value, msg=key)
    if slice_counts:  # sliced: every walk of the fast path in two slices
        assert all(count == 2 for count in slice_counts)
        assert len(slice_counts) >= 4  # forward and backward of both steps


def test_b0_evaluation_and_no_grad_use_the_running_variance_on_either_setting() -> None:
    fast, reference = _pair("evonorm_b0", 4)
    x = torch.randn(5, 4, 3, 3, dtype=F64)
    fast(x), reference(x)
    fast.eval(), reference.eval()
    torch.testing.assert_close(fast(x), reference(x))


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_output_is_no_view_so_an_inplace_relu_after_it_is_cheap_and_right(name: str
                                                                               ) -> None:
    """A view output would make autograd rebuild the in-place ReLU through CopySlices (full
    copies and strided passes in every backward)."""
    fast, reference = _pair(name, 4)
    x = torch.randn(6, 4, 3, 3, dtype=F64).contiguous(memory_format=torch.channels_last)
    g = torch.randn(6, 4, 3, 3, dtype=F64)
    outs = []
    for layer in (fast, reference):
        xi = x.detach().requires_grad_()
        y = layer(xi)
        assert y._base is None
        z = torch.relu_(y)
        assert "CopySlices" not in type(z.grad_fn).__name__
        outs.append(torch.autograd.grad(z, [xi, *layer.parameters()], g))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b)


def test_frn_ties_at_the_threshold_send_the_gradient_to_tau_on_both_paths() -> None:
    """Zero inputs (a conv without bias over zero padding) give y = beta = tau: a tie of the
    TLU. Both paths use max(y, tau) = relu(y - tau) + tau, whose gradient at the tie goes to
    tau."""
    for fast in (True, False):
        layer = FilterResponseNorm(2, dtype=F64, fast=fast)
        x = torch.zeros(3, 2, 2, 2, dtype=F64, requires_grad=True)
        dx, _, db, dtau = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
        assert torch.equal(dtau, torch.full((2,), 12.0, dtype=F64))  # every value, all to tau
        assert torch.equal(db, torch.zeros(2, dtype=F64)) and torch.isfinite(dx).all()


@pytest.mark.parametrize("name", list(LAYERS))
def test_double_backward_through_the_fast_path_is_the_references(name: str) -> None:
    fast, reference = _pair(name, 4)
    x = torch.randn(3, 4, 2, 3, dtype=F64)
    g = torch.randn(3, 4, 2, 3, dtype=F64)
    second = []
    for layer in (fast, reference):
        xi = x.detach().requires_grad_()
        (dx,) = torch.autograd.grad(layer(xi), xi, g, create_graph=True)
        second.append(torch.autograd.grad(dx.square().sum(), [xi, *layer.parameters()],
                                          allow_unused=True, materialize_grads=True))
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", list(LAYERS))
def test_half_inputs_on_the_fast_path(name: str) -> None:
    fast, reference = _pair(name, 4)
    fast.float(), reference.float()
    x = torch.randn(3, 4, 2, 2, dtype=torch.bfloat16)
    y, y_ref = fast(x), reference(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
