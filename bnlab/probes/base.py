"""The probe plugin: what a probe declares, and what it is given.

A probe is one class, in its own module of ``bnlab/probes/``, that subclasses ``Probe``. The
class declares everything the rest of bnlab needs to know about it, and all of that is derived
from the declaration:

- ``name``: its interval key is ``probe.<name>_every``;
- ``Keys``: its config keys, a pydantic schema with defaults, bounds and descriptions (the
  ``probe`` config schema and ``configs/probe/default.yaml`` are made from these, see
  ``bnlab.probes.config``);
- ``runs``: where in the step it measures (``Where``); step 0, before training, is a
  ``probe_batch`` measurement like any other;
- ``tags``: every tag it logs, with a one-line meaning (README's tag table);
- ``columns`` and ``panels``, optionally: its numbers in ``bnlab compare`` and its rows in
  ``bnlab plot``.

Subclasses register themselves in ``REGISTRY`` when their module is imported; ``PROBES`` lists
the modules, so ``registered()`` finds every probe, in order, and ``Probes`` loops over them. A
probe measures only at steps where ``due(step)``: its interval divides the step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.models import Slot
from bnlab.probes.functional import LossFn, loss_and_grads
from bnlab.probes.readonly import read_only
from bnlab.registry import Schema

# Where a probe measures; a probe may run at several of these points of a step:
# - after_backward: on the step's training batch, after loss.backward() and before
#   optimizer.step() (``.grad`` holds the step's gradient);
# - probe_batch: in the shared train-mode forward of the fixed probe batch (``forward``), after
#   the optimizer step and at step 0; one forward serves every probe that is due;
# - after_step: after optimizer.step(), the weights updated.
Where = Literal["after_backward", "probe_batch", "after_step"]
# The methods a probe implements for each point.
METHODS: dict[str, tuple[str, ...]] = {"after_backward": ("after_backward",),
                                       "probe_batch": ("attach", "measure"),
                                       "after_step": ("after_step",)}
# Placeholders in tag patterns that stand for a module path: a watched position, a norm layer,
# any module (``<param>`` stands for a parameter's name).
MODULE_PLACEHOLDERS = ("<layer>", "<norm>", "<module>")

Interval = Annotated[int, Field(ge=0, description="steps between measurements; 0: off")]
# The probes' modules in ``bnlab/probes/``, in the order the probes run at each point of a step
# and in which their keys, columns and panels are listed.
PROBES = ("gradients", "activations", "ics", "landscape", "whiteness", "bnstats", "gram",
          "scale")
REGISTRY: dict[str, type[Probe]] = {}


@dataclass
class Measurements:
    scalars: dict[str, Tensor | float] = field(default_factory=dict)  # tag -> 0-d tensor/float
    histograms: dict[str, Tensor] = field(default_factory=dict)       # tag -> 1-D values

    def update(self, other: Measurements) -> None:
        self.scalars.update(other.scalars)
        self.histograms.update(other.histograms)


@dataclass(frozen=True)
class Column:
    """A per-run number of ``bnlab compare`` (a row shows its mean ± std over seeds), computed
    from the run's event files: each tag of ``tags`` (a tag, or a prefix ending in ``/`` for one
    tag per module) is reduced over its steps, then the tags over modules."""

    key: str  # the name in CSV and JSON
    header: str  # the column header of the human formats
    tags: str
    steps: Literal["mean", "max", "last"]  # mean, max: of the finite values; last: the last
    #                                        value (none if it is not finite)
    modules: Literal["mean", "deepest"] = "mean"  # deepest: the last tag logged
    percent: bool = False  # a fraction, shown in percent
    optional: bool = False  # only some runs have it: human formats drop it when no row does


@dataclass(frozen=True)
class Panel:
    """A row of ``bnlab plot``'s figure: a curve over steps per module of the tags under
    ``prefix``."""

    prefix: str
    label: str  # the y label
    log: bool = False  # a log y axis, when every value is > 0


@dataclass(frozen=True)
class Setup:
    """What a probe is built from: the run's parts and the watched positions."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    probe_inputs: Tensor  # the fixed probe batch's images
    slots: list[Slot]
    watched: list[str]  # the module paths ``probe.layers`` selects, in forward order


class TrainingBatch:
    """The step's training batch as the ``after_backward`` probes see it.

    A probe that runs forwards of its own calls ``train_mode()`` first: the model is then
    read-only (``readonly.read_only``) and in train mode until every probe of this step is done,
    so their forwards follow one another as in one block, in the probes' order. ``grads`` is
    ∇L at the current weights, computed once per step for the probes that ask for it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, inputs: Tensor,
                 targets: Tensor) -> None:
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self._stack = contextlib.ExitStack()
        self._read_only = False

    def __enter__(self) -> TrainingBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def train_mode(self) -> None:
        if not self._read_only:
            self._stack.enter_context(read_only(self.model))
            self._read_only = True
        self.model.train()

    @functools.cached_property
    def grads(self) -> dict[str, Tensor]:
        """∇L of every trainable parameter, by name, from the probes' own forward of the batch
        (train mode, fixed seed, no autocast; ``functional.loss_and_grads``), so that probes
        comparing gradients at moved weights differ from it only by the weights."""
        self.train_mode()
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        _, grads = loss_and_grads(self.model, self.loss_fn, self.inputs, self.targets, params,
                                  list(params))
        return dict(zip(params, grads, strict=True))


class Probe:
    """Base of every probe; see the module docstring for what a subclass declares."""

    name: ClassVar[str]
    Keys: ClassVar[type[Schema]]
    runs: ClassVar[tuple[Where, ...]]
    tags: ClassVar[dict[str, str]]  # tag pattern -> one-line meaning
    columns: ClassVar[tuple[Column, ...]] = ()
    panels: ClassVar[tuple[Panel, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if f"{cls.name}_every" not in cls.Keys.model_fields:
            raise TypeError(f"{cls.__name__}.Keys has no interval key {cls.name}_every")
        for where in cls.runs:
            for method in METHODS[where]:
                if getattr(cls, method) is getattr(Probe, method):
                    raise TypeError(f"{cls.__name__} runs at {where} but has no {method}()")
        if cls.name in REGISTRY:
            raise TypeError(f"two probes named {cls.name}: {REGISTRY[cls.name]}, {cls}")
        REGISTRY[cls.name] = cls

    def __init__(self, cfg: Any, setup: Setup) -> None:
        """``cfg``: the validated ``probe`` config (``bnlab.probes.config.ProbeConfig``)."""
        self.every: int = getattr(cfg, f"{self.name}_every")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def after_backward(self, step: int, batch: TrainingBatch) -> Measurements:
        """Measure on the training batch (``step`` is 1-based)."""
        raise NotImplementedError

    def attach(self) -> list[RemovableHandle]:
        """Hooks that record what this probe needs in the next probe-batch forward; the caller
        removes them."""
        raise NotImplementedError

    def measure(self, step: int) -> Measurements:
        """The measurements of the probe-batch forward just observed (``step`` steps done)."""
        raise NotImplementedError

    def after_step(self, step: int) -> Measurements:
        """Measure after optimizer step ``step``."""
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        """What a resumed run needs to continue this probe's measurements (None: nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def registered() -> list[type[Probe]]:
    """Every probe of ``PROBES``, in that order (importing a module registers its probe)."""
    modules = [importlib.import_module(f"{__package__}.{name}").__name__ for name in PROBES]
    return [probe for module in modules for probe in REGISTRY.values()
            if probe.__module__ == module]


def compare_columns() -> list[Column]:
    return [column for probe in registered() for column in probe.columns]


def plot_panels() -> list[Panel]:
    return [panel for probe in registered() for panel in probe.panels]


def module_groups() -> list[str]:
    """The tag groups whose tags end in a module path."""
    return list(dict.fromkeys(tag.split("/", 1)[0] for probe in registered()
                              for tag in probe.tags if tag.endswith(MODULE_PLACEHOLDERS)))


def every(default: int, what: str) -> Any:
    """The field of an interval key ``<name>_every`` measuring ``what``."""
    return Field(default, description=f"{what}: every this many steps (0: off)")


def interval_keys(probe: type[Probe]) -> list[str]:
    return [key for key in probe.Keys.model_fields if key.endswith("_every")]

