"""The ``fast`` switch of the layers and ``norm.fast``: with it off the reference code is what
runs, forward and backward, for every layer with a fast path; with it on the fast path runs;
both give the same results, in one layer and in a ``bnlab train`` run.

Spies wrap the implementations where the layers look them up (the autograd Functions' forward
and backward, the reference functions) and record which ran.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import bnlab.nn as bnn
import bnlab.nn.batchnorm as bnbn
import bnlab.nn.evonorm as evonorm
import bnlab.nn.frn as frn
import bnlab.nn.groupnorm as groupnorm
import bnlab.nn.normfree_fast as normfree_fast
import bnlab.nn.renorm as renorm
from bnlab.config import validate
from bnlab.registry import load_option
from tests.cli import bnlab, metrics, tiny
from tests.test_registry import compose_cfg

F64 = torch.float64


def _spy_function(monkeypatch: pytest.MonkeyPatch, calls: list[str], fn_cls: type, tag: str
                  ) -> None:
    """Record ``tag.forward`` / ``tag.backward`` whenever the autograd Function runs."""
    for method in ("forward", "backward"):
        real = getattr(fn_cls, method)

        def spy(ctx, *args, _real=real, _name=f"{tag}.{method}"):
            calls.append(_name)
            return _real(ctx, *args)

        monkeypatch.setattr(fn_cls, method, staticmethod(spy))


def _spy_callable(monkeypatch: pytest.MonkeyPatch, calls: list[str], module: object, name: str,
                  tag: str) -> None:
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which implementation ran: every fast and reference piece of the layers, spied."""
    record: list[str] = []
    for fn_cls, tag in ((bnbn._BatchNormTrainFn, "bn.ref.train"),
                        (bnbn._BatchNormEvalFn, "bn.ref.eval"),
                        (bnbn.FastTrainFn, "bn.fast.train"), (bnbn.FastEvalFn, "bn.fast.eval"),
                        (groupnorm._PooledRowNormFn, "rows.fast"),
                        (normfree_fast._FilterResponseNormFn, "frn.fast"),
                        (normfree_fast._EvoNormB0TrainFn, "b0.fast"),
                        (normfree_fast._EvoNormS0Fn, "s0.fast")):
        _spy_function(monkeypatch, record, fn_cls, tag)
    _spy_callable(monkeypatch, record, groupnorm, "_reference", "rows.ref")
    _spy_callable(monkeypatch, record, frn, "filter_response_norm", "frn.ref")
    _spy_callable(monkeypatch, record, evonorm, "evonorm_b0", "b0.ref")
    _spy_callable(monkeypatch, record, evonorm, "evonorm_s0", "s0.ref")
    _spy_callable(monkeypatch, record, renorm, "batch_stats", "renorm.ref.stats")
    _spy_callable(monkeypatch, record, renorm, "batch_stats_fast", "renorm.fast.stats")
    return record


BN_TRAIN, BN_EVAL = ("bn.{}.train.forward", "bn.{}.train.backward"), ("bn.{}.eval.forward",
                                                                      "bn.{}.eval.backward")
ROWS = ("rows.ref",), ("rows.fast.forward", "rows.fast.backward")  # (reference, fast)
FRN = ("frn.ref",), ("frn.fast.forward", "frn.fast.backward")
B0_TRAIN = ("b0.ref",), ("b0.fast.forward", "b0.fast.backward")
B0_EVAL = ("b0.ref",), ("b0.ref",)  # evaluation: the reference on either setting
S0 = ("s0.ref",), ("s0.fast.forward", "s0.fast.backward")

# layer, input shape, and what a train and an eval step run, per path ("{}": ref or fast)
LAYERS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], dict[str, tuple]]] = {
    "bn1d": (bnn.BatchNorm1d, (6, 3), {"train": BN_TRAIN, "eval": BN_EVAL}),
    "bn1d-ncl": (bnn.BatchNorm1d, (4, 3, 5), {"train": BN_TRAIN, "eval": BN_EVAL}),
    "bn2d": (bnn.BatchNorm2d, (4, 3, 5, 5), {"train": BN_TRAIN, "eval": BN_EVAL}),
    "bn3d": (bnn.BatchNorm3d, (2, 3, 3, 4, 5), {"train": BN_TRAIN, "eval": BN_EVAL}),
    "noisy": (bnn.NoisyBatchNorm2d, (4, 3, 5, 5), {"train": BN_TRAIN, "eval": BN_EVAL}),
    "renorm1d": (bnn.BatchRenorm1d, (6, 3), {"train": (*BN_TRAIN, "renorm.{}.stats"),
                                             "eval": BN_EVAL}),
    "renorm2d": (bnn.BatchRenorm2d, (4, 3, 5, 5), {"train": (*BN_TRAIN, "renorm.{}.stats"),
                                                   "eval": BN_EVAL}),
    "ghost": (functools.partial(bnn.GhostBatchNorm2d, virtual_batch_size=2), (6, 3, 4, 4),
              {"train": ROWS, "eval": BN_EVAL}),
    "group": (functools.partial(bnn.GroupNorm, 3), (4, 3, 5, 5), {"train": ROWS, "eval": ROWS}),
    "layer": (functools.partial(bnn.GroupNorm, 1), (4, 3, 5, 5), {"train": ROWS, "eval": ROWS}),
    "frn": (bnn.FilterResponseNorm, (4, 3, 5, 5), {"train": FRN, "eval": FRN}),
    "frn-nc": (bnn.FilterResponseNorm, (6, 3), {"train": FRN, "eval": FRN}),
    "evonorm_b0": (bnn.EvoNormB0, (4, 3, 5, 5), {"train": B0_TRAIN, "eval": B0_EVAL}),
    "evonorm_s0": (functools.partial(bnn.EvoNormS0, groups=3), (4, 3, 5, 5),
                   {"train": S0, "eval": S0}),
}


def _expected(runs: tuple, fast: bool) -> set[str]:
    if isinstance(runs[0], tuple):  # (reference tags, fast tags)
        return set(runs[fast])
    return {tag.format("fast" if fast else "ref") for tag in runs}


def _step(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, ...]:
    x = x.clone().requires_grad_()
    torch.manual_seed(5)  # the same noise draw (noisy BN) in both paths
    y = layer(x)
    return (y, *torch.autograd.grad(y, [x, layer.weight, layer.bias], g))


@pytest.mark.parametrize("name", list(LAYERS))
def test_the_switch_picks_the_path_forward_and_backward(calls: list[str], name: str) -> None:
    """fast=False runs the reference pieces only, fast=True the fast ones only, in a train
    and an eval step; both give the same outputs, grads and running statistics (float64)."""
    make, shape, runs = LAYERS[name]
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.5)
    g = torch.randn(shape, generator=gen, dtype=F64)
    layers = {fast: make(3, fast=fast, dtype=F64) for fast in (False, True)}
    assert layers[True].fast and not layers[False].fast
    if hasattr(layers[False], "running_mean"):  # running stats away from init: renorm clips
        for layer in layers.values():
            layer.running_mean.fill_(0.3)
            layer.running_var.fill_(2.0)
    results = {}
    for mode in ("train", "eval"):
        for fast, layer in layers.items():
            layer.train(mode == "train")
            calls.clear()
            results[fast] = _step(layer, x, g)
            assert set(calls) == _expected(runs[mode], fast), (mode, fast, calls)
        for a, b in zip(results[False], results[True], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        for (key, a), (_, b) in zip(layers[False].state_dict().items(),
                                    layers[True].state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=key)


def test_fast_is_a_plain_attribute_not_state() -> None:
    """The switch changes neither the state dict, nor the repr, nor a copy's behaviour."""
    on, off = bnn.BatchNorm2d(3), bnn.BatchNorm2d(3, fast=False)
    assert on.state_dict().keys() == off.state_dict().keys()
    assert repr(on) == repr(off)
    assert copy.deepcopy(off).fast is False
    off.load_state_dict(on.state_dict())
    assert off.fast is False


@pytest.mark.parametrize("norm", ["custom", "noisy", "renorm", "ghost", "group", "layer",
                                  "torch", "none", "dbn", "iternorm", "frn", "evonorm_b0",
                                  "evonorm_s0"])
def test_norm_fast_reaches_every_layer_with_a_fast_path(norm: str) -> None:
    """``norm.fast`` is a key of every option; it sets ``fast`` on the layers that have one,
    and the others (torch's layers, an empty slot, decorrelated BN) are built as before."""
    extra = {"num_groups": 1} if norm == "group" else {}
    for fast in (True, False):
        option = load_option("norm", norm, fast=fast, **extra)
        assert option.fast is fast
        for dims in (1, 2):
            layer = option(4, dims)
            if option.fast_path:
                assert layer.fast is fast, (norm, dims)
            else:
                assert not hasattr(layer, "fast"), (norm, dims)
    assert load_option("norm", norm, **extra).fast is True  # the default
    # a sweep such as norm=custom,torch norm.fast=false: every job's config is valid
    validate(compose_cfg(f"norm={norm}", "norm.fast=false",
                         *(["norm.num_groups=4"] if norm == "group" else [])))


@pytest.mark.slow
def test_a_run_with_the_fast_paths_off_ends_where_the_fast_run_ends(tmp_path, cifar_root):
    """One ``bnlab train -m norm.fast=true,false`` sweep: the run with the reference code
    ends within float tolerance of the run with the fast paths (same seed, same batches)."""
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "probe=off", "model.dropout=0.3",
                                   "norm.fast=true,false", f"hydra.sweep.dir={sweep}",
                                   "hydra.sweep.subdir=fast_${norm.fast}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    fast_dir, ref_dir = sweep / "fast_True", sweep / "fast_False"
    fast, ref = metrics(fast_dir), metrics(ref_dir)
    assert fast["status"] == ref["status"] == "completed"
    assert fast["steps"] == ref["steps"] > 0
    assert ref["final_train_loss"] == pytest.approx(fast["final_train_loss"], rel=1e-4)
    a = torch.load(fast_dir / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(ref_dir / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(b[key], value), key
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two implementations, not one
