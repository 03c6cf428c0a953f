"""The norm-free alternatives of issue 23: FRN + TLU, EvoNorm B0 and EvoNorm S0.

Each layer is checked against a float64 oracle written out below from its paper's formulas
(Singh & Krishnan 2020; Liu et al. 2020), on 4-d maps, independently of the layers' code (which
works on (N, C, L) rows): forward, gradients (the oracle's autograd, and gradcheck /
gradgradcheck of the layer), B0's running variance and eval mode, the 1×1-map case, state
dicts, torch.compile, and the refusals of bad constructor values.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from bnlab.errors import UsageError
from bnlab.models import norm_factory
from bnlab.nn import EvoNormB0, EvoNormS0, FilterResponseNorm

F64 = torch.float64


def _input(shape: tuple[int, ...], dtype: torch.dtype = F64) -> Tensor:
    """Random values with mean 0.5 and std 2 (FRN and EvoNorm subtract no mean)."""
    return (torch.randn(shape, dtype=F64) * 2 + 0.5).to(dtype)


def _c(t: Tensor) -> Tensor:
    """A per-channel (C,) vector as (1, C, 1, 1)."""
    return t.view(1, -1, 1, 1)


def _randomize(layer: nn.Module) -> None:
    """Random per-channel parameters (γ > 0; β, τ, v of either sign), so that every term of the
    formulas matters."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "weight":
                p.uniform_(0.5, 1.5)
            elif name == "v":  # large enough for B0's v x + instance std to win somewhere
                p.uniform_(-2, 2)
            elif name != "learned_eps":
                p.normal_(0, 0.5)


def _as_map(x: Tensor) -> Tensor:
    """An (N, C) or (N, C, L) input as the (N, C, H, W) map the oracles take."""
    while x.dim() < 4:
        x = x.unsqueeze(-1)
    return x


# -- the oracles, from the papers ------------------------------------------------------------


def frn_oracle(x: Tensor, gamma: Tensor, beta: Tensor, tau: Tensor, eps: Tensor | float
               ) -> Tensor:
    """Singh & Krishnan 2020, Eq. 1-2: nu² = mean over H, W of x²; y = max(γ x/√(nu²+ε) + β, τ)."""
    nu2 = (x * x).mean(dim=(2, 3), keepdim=True)
    return torch.max(_c(gamma) * (x / torch.sqrt(nu2 + eps)) + _c(beta), _c(tau))


def _variance(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """The population variance E[(x − E[x])²] over ``dims``."""
    return ((x - x.mean(dim=dims, keepdim=True)) ** 2).mean(dim=dims, keepdim=True)


def b0_oracle(x: Tensor, gamma: Tensor, beta: Tensor, v: Tensor, eps: float,
              batch_var: Tensor | None = None) -> Tensor:
    """Liu et al. 2020, EvoNorm-B0: x / max(√(s²_B + ε), v x + √(s²_HW + ε)) γ + β; s²_B over
    (N, H, W) per channel (``batch_var``, the running variance in eval), s²_HW per sample and
    channel."""
    s2_b = _variance(x, (0, 2, 3)) if batch_var is None else _c(batch_var)
    s2_hw = _variance(x, (2, 3))
    den = torch.max(torch.sqrt(s2_b + eps), _c(v) * x + torch.sqrt(s2_hw + eps))
    return x / den * _c(gamma) + _c(beta)


def s0_oracle(x: Tensor, groups: int, gamma: Tensor, beta: Tensor, v: Tensor, eps: float
              ) -> Tensor:
    """Liu et al. 2020, EvoNorm-S0: x σ(v x) / √(s²_group + ε) γ + β, s²_group per sample over
    each group of C/G channels and H, W."""
    n, c, h, w = x.shape
    s2 = _variance(x.reshape(n, groups, c // groups, h, w), (2, 3, 4))
    std = torch.sqrt(s2 + eps).expand(n, groups, c // groups, h, w).reshape(n, c, h, w)
    return x * torch.sigmoid(_c(v) * x) / std * _c(gamma) + _c(beta)


def _oracle(layer: nn.Module, x: Tensor) -> Tensor:
    """The oracle of ``layer`` (in its mode) on ``x``, in ``x``'s shape."""
    xm = _as_map(x)
    if isinstance(layer, FilterResponseNorm):
        y = frn_oracle(xm, layer.weight, layer.bias, layer.tau, layer.effective_eps())
    elif isinstance(layer, EvoNormB0):
        running = None if layer.training else layer.running_var
        y = b0_oracle(xm, layer.weight, layer.bias, layer.v, layer.eps, running)
    else:
        y = s0_oracle(xm, layer.groups, layer.weight, layer.bias, layer.v, layer.eps)
    return y.reshape(x.shape)


LAYERS = {
    "frn": lambda c: FilterResponseNorm(c, dtype=F64),
    "frn_learned_eps": lambda c: FilterResponseNorm(c, learnable_eps=True, eps_init=0.3,
                                                    dtype=F64),
    "evonorm_b0": lambda c: EvoNormB0(c, dtype=F64),
    "evonorm_s0": lambda c: EvoNormS0(c, groups=2, dtype=F64),
}
# (shape, channels_last): conv maps in both layouts, the hidden linear slot's (N, C), and (N, C, L)
INPUTS = [((5, 4, 3, 2), False), ((5, 4, 3, 2), True), ((5, 4), False), ((5, 4, 6), False)]


# -- forward and backward against the oracles ------------------------------------------------


PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])


@PATHS
@pytest.mark.parametrize(("shape", "channels_last"), INPUTS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_equals_its_oracle_forward_and_backward(name: str, shape: tuple[int, ...],
                                                      channels_last: bool, fast: bool) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](shape[1])
    layer.fast = fast
    _randomize(layer)
    x = _input(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = [p for _, p in layer.named_parameters()]
    g = torch.randn(shape, dtype=F64)
    y, y_ref = layer(x), _oracle(layer, x)
    torch.testing.assert_close(y, y_ref)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    assert all(gr.abs().sum() > 0 for gr in grads)  # every parameter takes part


@PATHS
@pytest.mark.parametrize("name", list(LAYERS))
def test_gradcheck_and_double_backward(name: str, fast: bool) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](4)
    layer.fast = fast
    _randomize(layer)
    x = _input((2, 4, 2, 2)).requires_grad_()
    params = tuple(p for _, p in layer.named_parameters())

    def fn(x: Tensor, *ps: Tensor) -> Tensor:
        return torch.func.functional_call(layer, dict(zip(
            [n for n, _ in layer.named_parameters()], ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    if not fast:  # the fast path's double backward is the reference's (test_normfree_fast.py)
        assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_frn_learned_eps_is_bounded_below_and_learns() -> None:
    layer = FilterResponseNorm(3, eps=1e-3, learnable_eps=True, eps_init=0.5, dtype=F64)
    assert layer.learned_eps.item() == 0.5 and layer.effective_eps().item() == pytest.approx(0.501)
    x = _input((2, 3, 1, 1)).requires_grad_()
    layer(x).sum().backward()
    assert layer.learned_eps.grad is not None and layer.learned_eps.grad.abs() > 0
    with torch.no_grad():
        layer.learned_eps.fill_(-0.2)  # the sign is irrelevant: |ε_l|
    assert layer.effective_eps().item() == pytest.approx(0.201)
    with torch.no_grad():
        layer.learned_eps.zero_()
    assert layer.effective_eps().item() == 1e-3  # never below the constant
    fixed = FilterResponseNorm(3, eps=1e-3)
    assert fixed.learned_eps is None and fixed.effective_eps() == 1e-3
    assert "learned_eps" not in dict(fixed.named_parameters())


# -- B0: running variance and eval -----------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_b0_running_variance_and_eval_follow_batch_norm(momentum: float | None) -> None:
    torch.manual_seed(0)
    layer = EvoNormB0(4, momentum=momentum, dtype=F64)
    _randomize(layer)
    running, batches = torch.ones(4, dtype=F64), []
    for k in range(3):
        x = _input((6, 4, 3, 3)) * (k + 1)  # different variances each step
        batches.append(x)
        y = layer(x)
        torch.testing.assert_close(y, _oracle(layer, x))
        unbiased = x.var(dim=(0, 2, 3), correction=1)
        factor = 1 / (k + 1) if momentum is None else momentum
        running = (1 - factor) * running + factor * unbiased
        torch.testing.assert_close(layer.running_var, running)
    assert layer.num_batches_tracked.item() == 3
    layer.eval()
    x = _input((2, 4, 3, 3)).requires_grad_()
    y = layer(x)
    y_ref = b0_oracle(x, layer.weight, layer.bias, layer.v, layer.eps, running)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    # eval reads the running variance, never the batch's, and updates nothing
    torch.testing.assert_close(layer.running_var, running)
    assert layer.num_batches_tracked.item() == 3
    assert not torch.allclose(y, b0_oracle(x, layer.weight, layer.bias, layer.v, layer.eps))


def test_b0_training_needs_more_than_one_value_per_channel() -> None:
    layer = EvoNormB0(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(1, 3))).all()  # eval: the running variance


# -- 1×1 maps: finite by design --------------------------------------------------------------


def test_frn_on_a_1x1_map_is_a_smooth_sign() -> None:
    layer = FilterResponseNorm(3, eps=1e-6, dtype=F64)
    x = torch.tensor([[0.0, 1e-4, -1e6], [2.0, -3.0, 1e3]], dtype=F64).view(2, 3, 1, 1)
    x.requires_grad_()
    y = layer(x)  # γ = 1, β = τ = 0: relu(x / sqrt(x² + ε))
    torch.testing.assert_close(y, torch.relu(x / torch.sqrt(x * x + 1e-6)))
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(dx).all()
    assert dx[0, 1] == pytest.approx(1e-6 / (1e-8 + 1e-6) ** 1.5)  # ε / (x² + ε)^{3/2}
    # the hidden linear slot: an (N, C) input is the same map of one position
    torch.testing.assert_close(layer(x.detach().view(2, 3)), y.detach().view(2, 3))


def test_evonorm_on_a_1x1_map_has_zero_instance_variance() -> None:
    torch.manual_seed(0)
    x = _input((8, 4, 1, 1)).requires_grad_()
    b0 = EvoNormB0(4, dtype=F64)
    _randomize(b0)
    y = b0(x)
    batch_std = _c(torch.sqrt(x.detach().var(dim=(0, 2, 3), correction=0) + b0.eps))
    expected = x / torch.max(batch_std, _c(b0.v) * x + b0.eps ** 0.5) * _c(b0.weight) \
        + _c(b0.bias)
    torch.testing.assert_close(y, expected)
    s0 = EvoNormS0(4, groups=4, dtype=F64)  # one channel per group: a variance of one value
    _randomize(s0)
    z = s0(x)
    torch.testing.assert_close(
        z, x * torch.sigmoid(_c(s0.v) * x) / s0.eps ** 0.5 * _c(s0.weight) + _c(s0.bias))
    (dx_b0,) = torch.autograd.grad(y.sum(), x)
    (dx_s0,) = torch.autograd.grad(z.sum(), x)
    assert torch.isfinite(dx_b0).all() and torch.isfinite(dx_s0).all()
    b0.eval()
    assert torch.isfinite(b0(x)).all()


@pytest.mark.parametrize("norm", ["frn", "evonorm_b0", "evonorm_s0"])
def test_vgg11_last_stage_and_hidden_slots_stay_finite(norm: str) -> None:
    from bnlab.models import build_model

    torch.manual_seed(0)
    net = build_model("vgg11", norm_factory(norm), hidden=8)
    maps = []
    handles = [m.register_forward_pre_hook(lambda _m, args: maps.append(args[0].shape[2:]))
               for m in net.modules() if getattr(m, "is_norm_slot", False)]
    out = net(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    for h in handles:
        h.remove()
    # the last conv stage at 2×2; the 1×1 map after the fifth pooling feeds the (N, C) slots
    assert torch.Size([2, 2]) in maps and torch.Size([]) in maps
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_where_the_models_relu_follows_frn_tau_stays_at_zero() -> None:
    """The documented consequence of the slot convention (conv → slot → ReLU): the ReLU passes
    no gradient where the TLU outputs τ = 0, so τ gets none; in a residual block's last slot
    and its shortcut the sum comes first, and τ learns."""
    from bnlab.models import build_model

    for model, kwargs in (("cnn", {"channels": [4, 8], "hidden": 8}),
                          ("resnet20", {"width": 4, "blocks": 1})):
        torch.manual_seed(0)
        net = build_model(model, norm_factory("frn"), **kwargs)
        loss = nn.functional.cross_entropy(net(torch.randn(6, 3, 32, 32)),
                                           torch.randint(0, 10, (6,)))
        loss.backward()
        layers = {n: m for n, m in net.named_modules() if isinstance(m, FilterResponseNorm)}
        assert all(m.weight.grad.abs().sum() > 0 for m in layers.values())
        before_sum = {n for n in layers if n.endswith(("norm2", "shortcut.1"))}
        assert len(layers) == (3 if model == "cnn" else 9) and len(before_sum) == (
            0 if model == "cnn" else 5)
        for name, m in layers.items():
            assert (m.tau.grad.abs().sum() > 0) == (name in before_sum), name


# -- modes, state, half precision ------------------------------------------------------------


@pytest.mark.parametrize("name", ["frn", "frn_learned_eps", "evonorm_s0"])
def test_per_sample_layers_are_the_same_map_in_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](4)
    _randomize(layer)
    x = _input((3, 4, 2, 2))
    y = layer(x)
    assert torch.equal(layer.eval()(x), y)
    assert torch.equal(layer(x[:1]), y[:1])  # no batch dependence


@pytest.mark.parametrize(("name", "keys"), [
    ("frn", {"weight", "bias", "tau"}),
    ("frn_learned_eps", {"weight", "bias", "tau", "learned_eps"}),
    ("evonorm_b0", {"weight", "bias", "v", "running_var", "num_batches_tracked"}),
    ("evonorm_s0", {"weight", "bias", "v"}),
])
def test_state_dict_round_trip(name: str, keys: set[str]) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](4)
    _randomize(layer)
    x = _input((3, 4, 2, 2))
    layer(x)  # B0: moves the running variance
    state = layer.state_dict()
    assert set(state) == keys
    fresh = LAYERS[name](4)
    fresh.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("name", list(LAYERS))
def test_half_inputs_are_computed_in_float32(name: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name](4).float()
    x = _input((3, 4, 2, 2), torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = layer(x.float())
    torch.testing.assert_close(y.float(), reference, rtol=1e-2, atol=1e-2)


# -- compile ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_layer_matches_eager(name: str) -> None:
    torch.manual_seed(0)
    eager, twin = LAYERS[name](4), LAYERS[name](4)
    _randomize(eager)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # B0: the running variance moves between the steps
        x = _input((3, 4, 2, 2))
        a, b = eager(x), compiled(x)
        torch.testing.assert_close(a, b)
        a.square().sum().backward()
        b.square().sum().backward()
    for (k, p), q in zip(eager.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[k], v, msg=k)


# -- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "message"), [
    (lambda: FilterResponseNorm(0), "num_features must be an integer >= 1, got 0"),
    (lambda: FilterResponseNorm(4, eps=0.0), "eps must be a number > 0, got 0.0"),
    (lambda: FilterResponseNorm(4, eps=-1e-6), "eps must be a number > 0"),
    (lambda: FilterResponseNorm(4, learnable_eps=True, eps_init=0.0),
     "eps_init must be a number > 0, got 0.0"),
    (lambda: FilterResponseNorm(4, learnable_eps=1), "learnable_eps must be a bool, got 1"),
    (lambda: EvoNormB0(4, eps=0), "eps must be a number > 0, got 0"),
    (lambda: EvoNormB0(4, momentum=1.5), r"momentum must be a number in \[0, 1\] or None"),
    (lambda: EvoNormB0(4.0), "num_features must be an integer >= 1, got 4.0"),
    (lambda: EvoNormS0(6, groups=4), r"groups must be an integer >= 1 dividing num_features "
     r"\(6\), got 4"),
    (lambda: EvoNormS0(6, groups=0), "groups must be an integer"),
    (lambda: EvoNormS0(6, groups=2, eps=float("nan")), "eps must be a number > 0, got nan"),
])
def test_bad_constructor_values_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layer", [FilterResponseNorm(4), EvoNormB0(4), EvoNormS0(4, groups=2)])
def test_wrong_inputs_are_refused(layer: nn.Module) -> None:
    for bad in (torch.randn(3, 5, 2, 2), torch.randn(4)):
        with pytest.raises(ValueError, match=r"expected an \(N, 4, \*\) input"):
            layer(bad)


def test_evonorm_s0_groups_must_divide_every_slot() -> None:
    factory = norm_factory("evonorm_s0", groups=3)
    assert factory(6, 2).groups == 3
    with pytest.raises(UsageError, match=r"^norm.groups=3 does not divide a norm slot of 8 "
                                         "channels; choose a divisor of every slot's width$"):
        factory(8, 1)


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_norm_free_layer_trains_through_bnlab_train(tmp_path, cifar_root) -> None:
    """One sweep over the three norms, fast path on and off, on the tiny CIFAR-10: every run
    completes with finite losses, its checkpoint holds the layer's own parameters, moved by
    training, and the reference run ends within float tolerance of the fast one."""
    from tests.cli import bnlab, metrics, tiny

    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "probe=off", "epochs=1",
                                   "norm=frn,evonorm_b0,evonorm_s0", "norm.fast=true,false",
                                   f"hydra.sweep.dir={sweep}",
                                   "hydra.sweep.subdir=${norm.name}_${norm.fast}"),
              cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(
        f"{n}_{f}" for n in ("frn", "evonorm_b0", "evonorm_s0") for f in ("True", "False"))
    for norm in ("frn", "evonorm_b0", "evonorm_s0"):
        runs = {fast: sweep / f"{norm}_{fast}" for fast in (True, False)}
        m = metrics(runs[True])
        assert m["status"] == "completed" and m["config"]["norm"] == norm, (norm, m["status"])
        assert m["steps"] == 10 and len(m["history"]) == 1
        assert all(torch.isfinite(torch.tensor([h["train_loss"], h["test_loss"]])).all()
                   for h in m["history"])
        state = torch.load(runs[True] / "checkpoint.pt", weights_only=True)["model"]
        first = "features.1."  # the first conv slot of model=cnn
        if norm == "frn":
            assert not torch.equal(state[first + "weight"], torch.ones(4))
            assert state[first + "learned_eps"] != 1e-4  # learnable_eps is the default
        elif norm == "evonorm_b0":
            assert first + "running_mean" not in state
            assert not torch.equal(state[first + "running_var"], torch.ones(4))
            assert state[first + "num_batches_tracked"] == 10
        else:
            assert not torch.equal(state[first + "v"], torch.ones(4))
        reference = torch.load(runs[False] / "checkpoint.pt", weights_only=True)["model"]
        assert metrics(runs[False])["final_train_loss"] == pytest.approx(
            m["final_train_loss"], rel=1e-4)
        for key, value in state.items():
            if value.is_floating_point():
                torch.testing.assert_close(reference[key], value, rtol=1e-3, atol=1e-4, msg=key)
            else:
                assert torch.equal(reference[key], value), key
        assert any(not torch.equal(state[k], reference[k]) for k in state), norm  # two paths
