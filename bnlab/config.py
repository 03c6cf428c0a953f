"""The schema of a composed ``bnlab train`` config, and ``validate``: a bad value fails in one line
naming the key, the value and what is allowed, before any run dir is written.

Hydra rejects unknown keys and options; every value is then checked here against a pydantic
schema: the top-level keys (:class:`TrainConfig`), ``data``, ``eval`` and ``dist`` below (with
the data-parallel world, :func:`bnlab.distributed.check_world`), ``probe`` (:class:`ProbeConfig`,
made from the probes' declarations in ``bnlab.probes.config``), and the group options through
their registered classes (``bnlab.registry``: ``model``, ``norm``, ``optim``, ``sched``).
Finally the model is built on the meta device (no memory, no compute), so a norm that does not
fit a model's slots (e.g. ``norm.num_groups`` not dividing a width) and a ``probe.layers`` entry
that names no slot of the model also fail before training.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import Field, model_validator

from bnlab import models, norms, optim  # noqa: F401  (registers the group options)
from bnlab.distributed import check_world
from bnlab.models import find_slots
from bnlab.probes.config import validate_probe_cfg, watched_layers
from bnlab.registry import Option, Schema, build, check, load_option

PositiveInt = Annotated[int, Field(ge=1)]


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


class DistConfig(Schema):
    nproc: int = Field(ge=1, description="processes of a data-parallel (DDP) run on this "
                       "machine, started through torch's elastic launcher; 1: one process")


class EvalConfig(Schema):
    precise_bn_batches: int = Field(
        ge=0, description="training batches from which Precise BN re-estimates the norm "
        "layers' statistics before each evaluation (0: off)")


def validate(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value of ``cfg`` and what is allowed."""
    # (only its own keys: the groups are checked below, and Hydra's node may not resolve yet)
    check(TrainConfig, OmegaConf.masked_copy(cfg, list(TrainConfig.model_fields)))
    for group in ("data", "model", "norm", "optim", "sched"):
        build(group, cfg[group])
    check(EvalConfig, cfg.eval, "eval")
    probe = validate_probe_cfg(cfg.probe)
    check(DistConfig, cfg.dist, "dist")
    norm = build("norm", cfg.norm)
    assert isinstance(norm, norms.NormOption)
    # (a norm in some slots, norm.rest in the others: both normalize under DDP)
    placed = [norm] if norm.slots == "all" else [norm, load_option("norm", norm.rest)]
    check_world(cfg.batch_size, cfg.dist.nproc, next(
        (n.name for n in placed if n.per_process_batch), None))  # type: ignore[attr-defined]
    built = meta_model(cfg)
    watched_layers(probe.layers, find_slots(built))  # positions of this model only


def meta_model(cfg: DictConfig) -> torch.nn.Module:
    """The model of ``cfg.model`` with ``cfg.norm`` in its slots, built on the meta device (no
    memory, no compute): a norm that does not fit the model's slots fails here, in one line."""
    model, norm = build("model", cfg.model), build("norm", cfg.norm)
    with torch.device("meta"):
        return model.build(norm)  # type: ignore[attr-defined]
