"""The schema of a composed ``bnlab train`` config, and ``validate``: a bad value fails in one line
naming the key, the value and what is allowed, before any run dir is written.

Hydra rejects unknown keys and options; every value is then checked here against a pydantic
schema: the top-level keys (:class:`TrainConfig`), ``data``, ``eval`` and ``probe`` below, and
the group options through their registered classes (``bnlab.registry``: ``model``, ``norm``,
``optim``, ``sched``). Finally the model is built on the meta device (no memory, no compute),
so a norm that does not fit a model's slots (e.g. ``norm.num_groups`` not dividing a width)
also fails before training.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, model_validator

from bnlab import models, norms, optim  # noqa: F401  (registers the group options)
from bnlab.registry import Option, Schema, build, check

PositiveInt = Annotated[int, Field(ge=1)]
Interval = Annotated[int, Field(ge=0, description="steps between measurements; 0: off")]


class TrainConfig(Schema):
    """The top-level keys (the groups are checked on their own)."""

    seed: int = Field(description="seed of weights, data order, augmentation and dropout")
    epochs: PositiveInt
    batch_size: int = Field(ge=2, description="an integer >= 2 (BN needs 2+ samples)")
    eval_batch_size: PositiveInt
    log_every: PositiveInt
    threads: PositiveInt | None
    diverge_factor: float = Field(gt=1, description="diverged when the loss exceeds this × the "
                                  "first loss (a number > 1)")
    progress: Literal["auto"] | bool
    compile: bool
    channels_last: Literal["auto"] | bool
    amp: bool
    deterministic: bool
    overwrite: bool
    resume: bool
    keep_epoch_checkpoints: bool = Field(
        description="also keep the checkpoint of every epoch's end, and of the initial "
        "weights, as checkpoints/epoch_NNN.pt (for bnlab curvature --epoch)")
    device: str = Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto, cpu, cuda, cuda:N or mps")

    @model_validator(mode="after")
    def _resume_or_overwrite(self) -> TrainConfig:
        if self.resume and self.overwrite:
            raise ValueError("resume=true and overwrite=true contradict each other: resume "
                             "continues the run in its dir, overwrite deletes it; pass one")
        return self


class Augment(Schema):
    crop: bool = Field(description="random 32×32 crop after 4-pixel zero padding")
    flip: bool = Field(description="random horizontal flip")


class DataOption(Option):
    """Base of the ``data`` options (the loading itself is ``bnlab.data.load``)."""

    group: ClassVar[str] = "data"
    root: str | None = Field(description="a folder holding cifar-10-batches-py")
    download: bool
    url: str | None
    md5: str | None
    train_size: PositiveInt | None = Field(description="class-balanced subset; null: all")
    test_size: PositiveInt | None = Field(description="class-balanced subset; null: all")
    augment: Augment


class Cifar10(DataOption):
    name: Literal["cifar10"] = "cifar10"


class Synthetic(DataOption):
    name: Literal["synthetic"] = "synthetic"


class EvalConfig(Schema):
    precise_bn_batches: int = Field(
        ge=0, description="training batches from which Precise BN re-estimates the norm "
        "layers' statistics before each evaluation (0: off)")


class ProbeConfig(Schema):
    """The ``probe`` group's keys (``configs/probe/default.yaml`` documents each)."""

    enabled: bool
    batch_size: int = Field(ge=2, description="the fixed probe batch (>= 2)")
    act_every: Interval
    hist_every: Interval
    hist_samples: PositiveInt
    act_seed: Literal["fixed", "step"]
    grad_every: Interval
    ics_every: Interval
    landscape_every: Interval
    landscape_range: list[Annotated[float, Field(gt=0)]] = Field(min_length=2, max_length=2)
    landscape_points: int = Field(ge=2)
    white_every: Interval = 0
    bnstats_every: Interval = 0
    layers: Literal["all"] | list[str]

    @model_validator(mode="after")
    def _consistent(self) -> ProbeConfig:
        if self.hist_every and (not self.act_every or self.hist_every % self.act_every):
            # histograms are drawn from the activation probe's forward pass
            raise ValueError(f"hist_every={self.hist_every} must be 0 or a multiple of "
                             f"act_every={self.act_every}")
        low, high = self.landscape_range
        if low >= high:
            raise ValueError(f"landscape_range={[low, high]} must be [low, high] with "
                             "low < high (multiples of the base learning rate)")
        return self


def validate(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value of ``cfg`` and what is allowed."""
    # (only its own keys: the groups are checked below, and Hydra's node may not resolve yet)
    check(TrainConfig, OmegaConf.masked_copy(cfg, list(TrainConfig.model_fields)))
    for group in ("data", "model", "norm", "optim", "sched"):
        build(group, cfg[group])
    check(EvalConfig, cfg.eval, "eval")
    check(ProbeConfig, cfg.probe, "probe")
    model, norm = build("model", cfg.model), build("norm", cfg.norm)
    with torch.device("meta"):  # construction errors of the norm in this model's slots
        model.build(norm)  # type: ignore[attr-defined]
