"""Optimizers and learning-rate schedules (``bnlab.optim``), and the range test end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bnlab.optim import SGD, Adam, Constant, Cosine, LRRange, Step
from tests.cli import bnlab, metrics, scalars, tiny


def lrs(schedule, total: int = 10, per_epoch: int = 5, base: float = 0.1) -> list[float]:
    return [schedule.lr(base, step, total, per_epoch) for step in range(total)]


def test_warmup_then_constant_cosine_and_step():
    assert lrs(Constant(warmup_epochs=0.4)) == pytest.approx([0.05, 0.1] + [0.1] * 8)
    cosine = lrs(Cosine(warmup_epochs=0))
    assert cosine[0] == pytest.approx(0.1)
    assert cosine == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 10)) for s in range(10)])
    step = lrs(Step(warmup_epochs=0, milestones=[0.5, 0.8], gamma=0.1))
    assert step == pytest.approx([0.1] * 5 + [0.01] * 3 + [0.001] * 2)


def test_lr_range_grows_exponentially_from_lr_min_to_lr_max():
    seq = lrs(LRRange(lr_min=1e-4, lr_max=1.0), total=5, base=123.0)  # base lr is ignored
    assert seq == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    ratios = [b / a for a, b in itertools.pairwise(seq)]
    assert ratios == pytest.approx([10.0] * 4)


def test_lr_range_needs_lr_max_above_lr_min():
    with pytest.raises(ValueError, match=r"lr_max=0.001 must be > lr_min=0.01"):
        LRRange(lr_min=1e-2, lr_max=1e-3)


def test_optimizers_are_built_with_their_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = SGD(lr=0.1, momentum=0.0, nesterov=True, weight_decay=1e-4).build(params)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] is False  # Nesterov needs momentum
    adam = Adam(lr=1e-3, momentum=0.8, beta2=0.99, weight_decay=0.0).build(params)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.99)


@pytest.mark.slow
def test_the_range_test_stops_at_divergence_and_records_the_lr(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, "probe=off", "sched=lr_range", "sched.lr_min=1e-3",
                             "sched.lr_max=1e5", "norm=none", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = metrics(run_dir)
    assert m["diverged"] and m["status"] == "diverged"
    step = m["diverged_step"]
    total = 2 * (100 // 10)
    expected = 1e-3 * (1e5 / 1e-3) ** ((step - 1) / (total - 1))
    assert m["lr_at_divergence"] == pytest.approx(expected)
    logged = dict(scalars(run_dir)["opt/lr"])
    assert logged[step] == pytest.approx(expected, rel=1e-6)  # the lr that step trained with
    assert f"diverged at step {step} (lr {expected:.3g})" in r.stdout
