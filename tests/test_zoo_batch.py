"""The normalization zoo, part 1: group norm, Batch Renorm and Ghost BN (issue 16).

Each layer is checked against torch where torch has it (``nn.GroupNorm``; ``nn.BatchNorm*``
for the settings in which Batch Renorm and Ghost BN *are* batch norm), and otherwise against
float64 oracles written out below from the papers' formulas, independently of the layers' code.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnlab.nn.groupnorm as groupnorm_module
import bnlab.nn.passes as passes
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.groupnorm import GroupNorm
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d

F64 = torch.float64


@pytest.fixture(params=["whole", "sliced"])
def slicing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the eager engine on whole tensors, or a few samples per slice (the CPU path of large
    tensors), so both are checked on small inputs."""
    if request.param == "sliced":
        monkeypatch.setattr(passes, "_SLICE_BYTES", 1)
        monkeypatch.setattr(passes, "_MIN_SLICES", 1)
    return request.param


def _randomize_affine(*layers: nn.Module) -> None:
    """The same random (positive) weight and bias in every layer."""
    weight = torch.rand_like(layers[0].weight) + 0.5
    bias = torch.randn_like(layers[0].bias)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def _grads(y: Tensor, inputs: list[Tensor], g: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(y, inputs, g)


def _assert_close_all(ours: tuple[Tensor, ...], ref: tuple[Tensor, ...], **tol: float) -> None:
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)


def _input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Random values with mean 0.5 and std 2, drawn in float64 and rounded to ``dtype``."""
    return (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)


# --------------------------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------------------------

# (shape, channels_last): every rank torch's GroupNorm takes, and the channels_last layouts.
GN_INPUTS = [((5, 6), False), ((5, 6, 7), False), ((5, 6, 4, 3), False), ((5, 6, 4, 3), True),
             ((3, 6, 2, 3, 4), False), ((3, 6, 2, 3, 4), True)]


@pytest.mark.parametrize(("shape", "channels_last"), GN_INPUTS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_groupnorm_matches_torch(
    shape: tuple[int, ...], channels_last: bool, groups: int, dtype: torch.dtype, slicing: str
) -> None:
    torch.manual_seed(0)
    ours, ref = GroupNorm(groups, 6, dtype=dtype), nn.GroupNorm(groups, 6, dtype=dtype)
    _randomize_affine(ours, ref)
    x = _input(shape, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    y, y_ref = ours(x), ref(x)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(y, y_ref, **tol)
    grads = _grads(y, [x, ours.weight, ours.bias], g)
    _assert_close_all(grads, _grads(y_ref, [x, ref.weight, ref.bias], g), **tol)
    assert y.stride() == y_ref.stride()  # torch keeps channels_last; so do we
    assert grads[0].stride() == x.stride()


def test_groupnorm_gradcheck(slicing: str) -> None:
    torch.manual_seed(0)
    layer = GroupNorm(2, 4, dtype=F64)
    _randomize_affine(layer)
    x = _input((3, 4, 3, 2), F64).requires_grad_()
    inputs = (x, layer.weight, layer.bias)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return groupnorm_module.group_norm(x, 2, w, b, 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_layer_norm_is_group_norm_with_one_group() -> None:
    torch.manual_seed(0)
    x = _input((4, 6, 3, 5))
    y = GroupNorm(1, 6, affine=False)(x)
    torch.testing.assert_close(y, F.layer_norm(x, x.shape[1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_groupnorm_half_inputs_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ours, ref = GroupNorm(3, 6), nn.GroupNorm(3, 6)
    _randomize_affine(ours, ref)
    x = _input((4, 6, 5, 5), dtype).requires_grad_()
    y = ours(x)
    assert y.dtype == dtype
    # torch's CPU kernel computes in float32 too: results agree to the output rounding.
    torch.testing.assert_close(y, ref(x))
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == dtype


def test_groupnorm_module_api_matches_torch() -> None:
    for kwargs in ({}, {"affine": False}, {"bias": False}, {"eps": 1e-3}):
        ours, ref = GroupNorm(2, 4, **kwargs), nn.GroupNorm(2, 4, **kwargs)
        assert repr(ours) == repr(ref)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with pytest.raises(ValueError, match=r"^num_channels \(6\) must be divisible by "
                       r"num_groups \(4\)$"):
        GroupNorm(4, 6)


def test_groupnorm_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    ours, ref = GroupNorm(3, 6), nn.GroupNorm(3, 6)
    _randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    x = _input((2, 6, 4))
    torch.testing.assert_close(ours(x), ref(x))
    back = nn.GroupNorm(3, 6)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.weight, ref.weight)
    torch.testing.assert_close(back.bias, ref.bias)


@pytest.mark.parametrize(("groups", "channels", "affine", "shape"), [
    (2, 4, True, (4,)),  # fewer than 2 dims
    (2, 4, True, (1, 2)),  # one value per group
    (2, 4, True, (2, 6, 3)),  # weight size != channels
    (2, 2, False, (2, 3, 3)),  # channels not divisible by the groups
])
def test_groupnorm_call_errors_match_torch(groups: int, channels: int, affine: bool,
                                           shape: tuple[int, ...]) -> None:
    x = torch.randn(shape)
    with pytest.raises(Exception) as expected:
        nn.GroupNorm(groups, channels, affine=affine)(x)
    with pytest.raises(type(expected.value), match="^" + re.escape(str(expected.value)) + "$"):
        GroupNorm(groups, channels, affine=affine)(x)


def test_groupnorm_empty_batch() -> None:
    y = GroupNorm(2, 4)(torch.randn(0, 4, 3))
    assert y.shape == (0, 4, 3)


# --------------------------------------------------------------------------------------------
# Batch Renorm
# --------------------------------------------------------------------------------------------


def _renorm_oracle(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ioffe (2017), Algorithm 1, in float64: ``(y, r, d)``."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    x = x.double()
    mu_b = x.mean(dims)
    sigma_b = torch.sqrt(((x - mu_b.view(shape)) ** 2).mean(dims) + eps)
    sigma = torch.sqrt(running_var.double() + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu_b - running_mean.double()) / sigma, -d_max, d_max).detach()
    x_hat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return x_hat * weight.double().view(shape) + bias.double().view(shape), r, d


def _bn_running_update(running_mean: Tensor, running_var: Tensor, x: Tensor,
                       momentum: float) -> None:
    dims = [0, *range(2, x.dim())]
    x = x.double()
    running_mean.mul_(1 - momentum).add_(momentum * x.mean(dims))
    running_var.mul_(1 - momentum).add_(momentum * x.var(dims, correction=1))


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), [
    (BatchRenorm1d, nn.BatchNorm1d, (8, 5)),
    (BatchRenorm1d, nn.BatchNorm1d, (8, 5, 3)),
    (BatchRenorm2d, nn.BatchNorm2d, (8, 5, 3, 4)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_renorm_unclipped_is_batch_norm(cls: type, ref_cls: type, shape: tuple[int, ...],
                                        momentum: float | None) -> None:
    torch.manual_seed(0)
    ours = cls(5, momentum=momentum, r_max=1.0, d_max=0.0)
    ref = ref_cls(5, momentum=momentum)
    _randomize_affine(ours, ref)
    for _ in range(3):
        x = _input(shape).requires_grad_()
        g = torch.randn(shape)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        _assert_close_all(_grads(y, [x, ours.weight, ours.bias], g),
                          _grads(y_ref, [x, ref.weight, ref.bias], g))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    ours.eval()
    ref.eval()
    x = _input(shape)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("cls", [BatchRenorm1d, BatchRenorm2d])
def test_renorm_with_clipping_matches_paper(cls: type, slicing: str) -> None:
    torch.manual_seed(0)
    shape = (6, 4) if cls is BatchRenorm1d else (6, 4, 3, 2)
    eps, r_max, d_max, momentum = 1e-5, 1.5, 0.5, 0.3
    layer = cls(4, eps=eps, momentum=momentum, r_max=r_max, d_max=d_max, dtype=F64)
    _randomize_affine(layer)
    # Running statistics far from the batches' in channels 0-1 (r, d clipped) and close in 2-3.
    layer.running_mean.copy_(torch.tensor([3.0, -3.0, 0.4, 0.6]))
    layer.running_var.copy_(torch.tensor([0.1, 40.0, 4.0, 4.2]))
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    clipped = []
    for _ in range(3):
        x = _input(shape, F64).requires_grad_()
        g = torch.randn(shape, dtype=F64)
        params = [x, layer.weight, layer.bias]
        y_ref, r, d = _renorm_oracle(x, running_mean, running_var, layer.weight, layer.bias,
                                     eps, r_max, d_max)
        y = layer(x)
        torch.testing.assert_close(y, y_ref)
        _assert_close_all(_grads(y, params, g), _grads(y_ref, params, g))
        _bn_running_update(running_mean, running_var, x.detach(), momentum)
        torch.testing.assert_close(layer.running_mean, running_mean)
        torch.testing.assert_close(layer.running_var, running_var)
        clipped.append(torch.cat([torch.isclose(r, torch.tensor(r_max, dtype=F64))
                                  | torch.isclose(r, torch.tensor(1 / r_max, dtype=F64)),
                                  torch.isclose(d.abs(), torch.tensor(d_max, dtype=F64))]))
    # The oracle's r and d reached their clips somewhere and stayed inside elsewhere.
    at_clip = torch.stack(clipped)
    assert at_clip.any() and not at_clip.all()
    layer.eval()
    x = _input(shape, F64)
    ref = (nn.BatchNorm1d if cls is BatchRenorm1d else nn.BatchNorm2d)(4, dtype=F64).eval()
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ref(x))


def test_renorm_warmup_schedule() -> None:
    layer = BatchRenorm1d(3, r_max=3.0, d_max=5.0, warmup_steps=4)
    seen = []
    for _ in range(6):
        layer(torch.randn(8, 3))
        r_max_t, d_max_t = layer.clip_limits()
        seen.append((float(r_max_t), float(d_max_t)))
    assert seen == [(1.5, 1.25), (2.0, 2.5), (2.5, 3.75), (3.0, 5.0), (3.0, 5.0), (3.0, 5.0)]
    assert BatchRenorm1d(3, r_max=2.0, d_max=1.0).clip_limits() == (2.0, 1.0)


def test_renorm_warmup_limits_apply_to_the_step() -> None:
    torch.manual_seed(0)
    layer = BatchRenorm1d(4, r_max=3.0, d_max=5.0, warmup_steps=10, dtype=F64)
    layer.running_mean.fill_(4.0)
    layer.running_var.fill_(0.01)
    running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
    x = _input((8, 4), F64)
    # First step: t = 1, so r_max_1 = 1.2 and d_max_1 = 0.5 (both clip here).
    y_ref, r, d = _renorm_oracle(x, running_mean, running_var, layer.weight, layer.bias,
                                 1e-5, 1.2, 0.5)
    torch.testing.assert_close(layer(x), y_ref)
    torch.testing.assert_close(r, torch.full_like(r, 1.2))
    torch.testing.assert_close(d, torch.full_like(d, -0.5))


def test_renorm_without_running_stats_is_batch_norm() -> None:
    torch.manual_seed(0)
    ours = BatchRenorm2d(3, track_running_stats=False)
    ref = nn.BatchNorm2d(3, track_running_stats=False)
    _randomize_affine(ours, ref)
    x = _input((4, 3, 2, 2)).requires_grad_()
    g = torch.randn(4, 3, 2, 2)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        _assert_close_all(_grads(y, [x, ours.weight], g), _grads(y_ref, [x, ref.weight], g))


def _frozen_state(layer: nn.Module) -> Callable[..., Tensor]:
    """``layer``'s training forward with its buffers restored before every call, so that
    gradcheck sees one function (each call would otherwise update the running statistics)."""
    saved = {k: v.clone() for k, v in layer.named_buffers()}

    def forward(x: Tensor, *_params: Tensor) -> Tensor:
        with torch.no_grad():
            for k, v in layer.named_buffers():
                v.copy_(saved[k])
        return layer(x)

    return forward


def test_renorm_gradcheck() -> None:
    # Finite differences see r and d move with x, the backward treats them as constants (the
    # paper's stop-gradient): the two agree where r and d sit at their clips, as here.
    torch.manual_seed(0)
    layer = BatchRenorm2d(3, r_max=1.5, d_max=0.5, dtype=F64)
    _randomize_affine(layer)
    layer.running_mean.copy_(torch.tensor([3.0, -10.0, 4.0]))
    layer.running_var.copy_(torch.tensor([0.1, 40.0, 0.05]))
    x = _input((4, 3, 2, 2), F64).requires_grad_()
    assert torch.autograd.gradcheck(_frozen_state(layer), (x, layer.weight, layer.bias))


@pytest.mark.parametrize(("ours", "ref"), [
    (BatchRenorm2d(3, r_max=2.0), nn.BatchNorm2d(3)),
    (GhostBatchNorm2d(3, virtual_batch_size=2), nn.BatchNorm2d(3)),
    (BatchRenorm1d(3), nn.BatchNorm1d(3)),
    (GhostBatchNorm1d(3), nn.BatchNorm1d(3)),
])
def test_state_dict_round_trip_with_torch_batch_norm(ours: nn.Module, ref: nn.Module) -> None:
    torch.manual_seed(0)
    shape = (4, 3, 2, 2) if isinstance(ref, nn.BatchNorm2d) else (4, 3)
    _randomize_affine(ours)
    for _ in range(2):
        ours(_input(shape))
    ref.load_state_dict(ours.state_dict())  # strict: same keys
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(ref.state_dict()[key], value)
    ref(_input(shape))  # torch's training step moves its buffers
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    ref.eval()
    x = _input(shape)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"r_max": 0.5}, "r_max"),
    ({"d_max": -1.0}, "d_max"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"warmup_steps": True}, "warmup_steps"),
])
def test_renorm_constructor_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be"):
        BatchRenorm2d(3, **kwargs)


def test_renorm_repr() -> None:
    assert repr(BatchRenorm2d(3, warmup_steps=7)).endswith(
        "r_max=3.0, d_max=5.0, warmup_steps=7)")


# --------------------------------------------------------------------------------------------
# Ghost BN
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), [
    (GhostBatchNorm1d, nn.BatchNorm1d, (8, 5)),
    (GhostBatchNorm1d, nn.BatchNorm1d, (8, 5, 3)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (8, 5, 3, 4)),
])
@pytest.mark.parametrize("virtual_batch_size", [8, 100])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_one_chunk_is_batch_norm(cls: type, ref_cls: type, shape: tuple[int, ...],
                                            virtual_batch_size: int,
                                            momentum: float | None) -> None:
    torch.manual_seed(0)
    ours = cls(5, virtual_batch_size=virtual_batch_size, momentum=momentum)
    ref = ref_cls(5, momentum=momentum)
    _randomize_affine(ours, ref)
    for _ in range(3):
        x = _input(shape).requires_grad_()
        g = torch.randn(shape)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        _assert_close_all(_grads(y, [x, ours.weight, ours.bias], g),
                          _grads(y_ref, [x, ref.weight, ref.bias], g))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    ours.eval()
    ref.eval()
    x = _input(shape)
    torch.testing.assert_close(ours(x), ref(x))


def _chunks(n: int, vbs: int, values_per_sample: int) -> list[int]:
    """The chunk rule, restated: chunks of vbs, the remainder last, merged into the previous
    chunk when it would hold a single value per channel."""
    sizes = [vbs] * (n // vbs) + ([n % vbs] if n % vbs else [])
    if len(sizes) > 1 and sizes[-1] * values_per_sample == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


@pytest.mark.parametrize(("shape", "vbs", "sizes"), [
    ((12, 3, 2, 2), 4, [4, 4, 4]),  # even
    ((10, 3, 2, 2), 4, [4, 4, 2]),  # uneven
    ((9, 3, 2, 2), 4, [4, 4, 1]),  # a one-sample chunk, which has 4 values per channel
    ((9, 3), 4, [4, 5]),  # a one-value chunk: merged
    ((9, 3, 1), 2, [2, 2, 2, 3]),
])
def test_ghost_chunks_match_batch_norm_per_chunk(shape: tuple[int, ...], vbs: int,
                                                 sizes: list[int], slicing: str) -> None:
    torch.manual_seed(0)
    assert _chunks(shape[0], vbs, shape[2] * shape[3] if len(shape) == 4 else 1) == sizes
    cls = GhostBatchNorm2d if len(shape) == 4 else GhostBatchNorm1d
    momentum = 0.25
    layer = cls(3, virtual_batch_size=vbs, momentum=momentum, dtype=F64)
    _randomize_affine(layer)
    x = _input(shape, F64).requires_grad_()
    g = torch.randn(shape, dtype=F64)
    y = layer(x)
    y_ref = torch.cat([F.batch_norm(c, None, None, layer.weight, layer.bias, True, 0.0, 1e-5)
                       for c in x.split(sizes)])
    torch.testing.assert_close(y, y_ref)
    params = [x, layer.weight, layer.bias]
    _assert_close_all(_grads(y, params, g), _grads(y_ref, params, g))
    # Running statistics: batch mean and pooled within-chunk variance, one update.
    dims = [0, *range(2, x.dim())]
    xd = x.detach()
    squares = sum(((c - c.mean(dims, keepdim=True)) ** 2).sum(dims) for c in xd.split(sizes))
    n = xd.numel() // 3
    torch.testing.assert_close(layer.running_mean, momentum * xd.mean(dims))
    torch.testing.assert_close(layer.running_var,
                               (1 - momentum) + momentum * squares / (n - len(sizes)))
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


def test_ghost_channels_last() -> None:
    torch.manual_seed(0)
    layer = GhostBatchNorm2d(3, virtual_batch_size=2)
    x = _input((6, 3, 4, 5))
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    g = torch.randn(6, 3, 4, 5)
    y, y_cl = layer(x), layer(x_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    (dx,), (dx_cl,) = _grads(y, [x], g), _grads(y_cl, [x_cl], g)
    assert dx_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx_cl, dx)


def test_ghost_gradcheck(slicing: str) -> None:
    torch.manual_seed(0)
    layer = GhostBatchNorm2d(3, virtual_batch_size=2, dtype=F64)
    _randomize_affine(layer)
    x = _input((5, 3, 2, 2), F64).requires_grad_()
    inputs = (x, layer.weight, layer.bias)
    assert torch.autograd.gradcheck(_frozen_state(layer), inputs)
    assert torch.autograd.gradgradcheck(_frozen_state(layer), inputs)


def test_ghost_without_running_stats_uses_chunks_in_eval() -> None:
    torch.manual_seed(0)
    layer = GhostBatchNorm1d(3, virtual_batch_size=4, track_running_stats=False)
    x = _input((8, 3))
    y_train = layer(x)
    torch.testing.assert_close(layer.eval()(x), y_train)
    torch.testing.assert_close(y_train[:4], F.batch_norm(x[:4], None, None, training=True))


@pytest.mark.parametrize("virtual_batch_size", [1, 0, 2.5, True, "4"])
def test_ghost_constructor_errors(virtual_batch_size: object) -> None:
    with pytest.raises(ValueError, match=r"^virtual_batch_size must be an int >= 2"):
        GhostBatchNorm2d(3, virtual_batch_size=virtual_batch_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [GhostBatchNorm1d, BatchRenorm1d])
def test_call_errors_match_batch_norm(cls: type) -> None:
    layer, ref = cls(3), nn.BatchNorm1d(3)
    for x in (torch.randn(1, 3), torch.randn(2, 3, 4, 5)):
        with pytest.raises(ValueError) as expected:
            ref(x)
        with pytest.raises(ValueError, match="^" + re.escape(str(expected.value)) + "$"):
            layer(x)


# --------------------------------------------------------------------------------------------
# All three: torch.compile and half-precision inputs
# --------------------------------------------------------------------------------------------

ALL_LAYERS = [
    pytest.param(lambda: GroupNorm(2, 4), id="group"),
    pytest.param(lambda: BatchRenorm2d(4, r_max=1.5, d_max=0.5, warmup_steps=2), id="renorm"),
    pytest.param(lambda: GhostBatchNorm2d(4, virtual_batch_size=3), id="ghost"),
]


def _with_far_running_stats(layer: nn.Module) -> nn.Module:
    """Running statistics far from the inputs', so Batch Renorm's clips are active."""
    if getattr(layer, "running_mean", None) is not None:
        layer.running_mean.copy_(torch.tensor([2.0, -2.0, 0.0, 0.3]))
        layer.running_var.copy_(torch.tensor([0.1, 9.0, 1.0, 4.0]))
    return layer


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_compiled_matches_eager(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    eager = _with_far_running_stats(make())
    _randomize_affine(eager)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = _input((8, 4, 3, 3))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(8, 4, 3, 3)
        y, y_c = eager(x1), compiled(x2)
        torch.testing.assert_close(y_c, y)
        _assert_close_all(_grads(y_c, [x2, compiled_layer.weight, compiled_layer.bias], g),
                          _grads(y, [x1, eager.weight, eager.bias], g))
        for (name, a), (_, b) in zip(compiled_layer.named_buffers(), eager.named_buffers(),
                                     strict=True):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("make", ALL_LAYERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_half_inputs_computed_in_float32(make: Callable[[], nn.Module], dtype: torch.dtype,
                                         compiled: bool) -> None:
    torch.manual_seed(0)
    layer = _with_far_running_stats(make())
    _randomize_affine(layer)
    oracle = copy.deepcopy(layer).double()
    x = _input((9, 4, 3, 3), dtype).requires_grad_()
    y = (torch.compile(layer, backend="aot_eager") if compiled else layer)(x)
    y_ref = oracle(x.detach().double())
    assert y.dtype == dtype
    # Computed in float32 and rounded once: within an ulp or two of the float64 result.
    ulp = torch.finfo(dtype).eps * y_ref.abs().clamp_min(1.0)
    assert ((y.double() - y_ref).abs() <= 2 * ulp).all()
    for (name, buf), (_, ref) in zip(layer.named_buffers(), oracle.named_buffers(), strict=True):
        torch.testing.assert_close(buf.to(ref.dtype), ref, msg=name, rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.dtype == dtype and torch.isfinite(dx).all()


@pytest.mark.parametrize("make", [lambda: GroupNorm(3, 6), lambda: GroupNorm(1, 6),
                                  lambda: GhostBatchNorm2d(6, virtual_batch_size=2),
                                  lambda: BatchRenorm2d(6)],
                         ids=["group3", "layer", "ghost", "renorm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fast_output_is_no_view(make: Callable[[], nn.Module], channels_last: bool) -> None:
    """The eager output is a tensor of its own: an in-place ReLU on a view of a Function's
    output would make autograd copy the whole gradient (CopySlices) in every backward."""
    layer = make()
    x = _input((4, 6, 3, 5))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)
    assert not y._is_view()
    assert type(y.relu_().grad_fn).__name__ == "ReluBackward0"
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else
                           torch.contiguous_format)
