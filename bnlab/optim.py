"""The ``optim`` and ``sched`` config groups: the optimizer and the learning-rate schedule.

A schedule is a pure function of the optimizer step, so a resumed run needs no scheduler state:
``lr(base_lr, step, total, per_epoch)`` is the learning rate of step ``step`` (0-based) of
``total``, with ``per_epoch`` steps an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from bnlab.registry import Option

PositiveLr = Annotated[float, Field(gt=0, description="learning rate (a finite number > 0)")]


class OptimOption(Option):
    """Base of the ``optim`` options; ``build(params)`` makes the torch optimizer."""

    group: ClassVar[str] = "optim"
    lr: PositiveLr
    momentum: float = Field(ge=0, lt=1, description="momentum (SGD) or β1 (Adam), in [0, 1)")
    weight_decay: float = Field(ge=0, description="L2 penalty (>= 0)")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError


class SGD(OptimOption):
    """SGD with (optionally Nesterov) momentum."""

    name: Literal["sgd"] = "sgd"
    nesterov: bool = Field(description="Nesterov momentum (only with momentum > 0)")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               nesterov=self.nesterov and self.momentum > 0,
                               weight_decay=self.weight_decay)


class Adam(OptimOption):
    """Adam (Kingma & Ba 2015); ``momentum`` is β1."""

    name: Literal["adam"] = "adam"
    beta2: float = Field(ge=0, lt=1, description="β2, in [0, 1)")

    def build(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, self.beta2),
                                weight_decay=self.weight_decay)


class SchedOption(Option):
    """Base of the ``sched`` options."""

    group: ClassVar[str] = "sched"

    def lr(self, base_lr: float, step: int, total: int, per_epoch: int) -> float:
        raise NotImplementedError


class WarmupSchedule(SchedOption):
    """A multiplier of the base lr after a linear warm-up from 0 over ``warmup_epochs``."""

    warmup_epochs: float = Field(ge=0, description="linear warm-up from 0 over this many epochs "
                                 "(fractions allowed)")

    def lr(self, base_lr: float, step: int, total: int, per_epoch: int) -> float:
        warmup = round(self.warmup_epochs * per_epoch)
        if step < warmup:
            return base_lr * (step + 1) / warmup
        return base_lr * self.factor((step - warmup) / max(1, total - warmup))

    def factor(self, progress: float) -> float:
        """The multiplier at ``progress`` in [0, 1) of the post-warm-up steps."""
        raise NotImplementedError


class Constant(WarmupSchedule):
    """The base lr throughout."""

    name: Literal["constant"] = "constant"

    def factor(self, progress: float) -> float:
        return 1.0


class Cosine(WarmupSchedule):
    """Cosine decay to 0 over the whole run (Loshchilov & Hutter 2017, without restarts)."""

    name: Literal["cosine"] = "cosine"

    def factor(self, progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * progress))


class Step(WarmupSchedule):
    """The lr is multiplied by ``gamma`` at each milestone (a fraction of training)."""

    name: Literal["step"] = "step"
    milestones: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        description="fractions of training, in (0, 1], at which the lr is multiplied by gamma")
    gamma: float = Field(gt=0, description="the factor at each milestone (> 0)")

    def factor(self, progress: float) -> float:
        return self.gamma ** sum(progress >= m for m in self.milestones)


class LRRange(SchedOption):
    """The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
    Networks", Sec. 3.3; fastai's ``lr_find``): the lr grows exponentially from ``lr_min`` at
    the first step to ``lr_max`` at the last, ignoring ``optim.lr``; the divergence rule stops
    the run and ``metrics.json`` records ``lr_at_divergence``."""

    name: Literal["lr_range"] = "lr_range"
    lr_min: PositiveLr
    lr_max: PositiveLr

    @model_validator(mode="after")
    def _increasing(self) -> LRRange:
        if self.lr_max <= self.lr_min:
            raise ValueError(f"lr_max={self.lr_max} must be > lr_min={self.lr_min}")
        return self

    def lr(self, base_lr: float, step: int, total: int, per_epoch: int) -> float:
        return self.lr_min * (self.lr_max / self.lr_min) ** (step / max(1, total - 1))
