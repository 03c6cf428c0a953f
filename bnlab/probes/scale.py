r"""Scale invariance during training: the norm, effective learning rate and angular update of
every scale-invariant weight, against the angular update that SGD settles to.

A weight is **scale-invariant** when c·w gives the same network for every c > 0 (van Laarhoven
2017). Found from the model's structure, a slot's layer (``bnlab.models.find_slots``) has one:

- when it has no bias and its slot's norm has batch statistics (the statistics interface,
  ``bnlab.nn.stats.statistics_of``): the norm divides by statistics of the same batch. Exact
  for BN and the variants that normalize with the batch's statistics (Ghost BN, noisy BN,
  decorrelated BN, EvoNorm B0, whose denominator scales with w), up to the norm's eps; for
  Batch Renorm after its warm-up only approximately (its r, d corrections use the running
  statistics);
- when it standardizes its own weight (``model.weight_std=ws|scaled``: ``bnlab.nn.WSConv2d``,
  ``ScaledWSConv2d``), with or without a norm: the normalization-free nets' scale-invariant
  weights.

Layer and Group Norm, which normalize each sample, also make the weight before them
scale-invariant, but they are not batch-statistics norms and are not measured here.

For each such weight w_t (before optimizer step t) and w_{t+1} (after it), on due steps, with the
learning rate η_t, momentum α and weight decay λ of the weight's parameter group:

- ``scale/weight_norm/<layer>`` = ‖w_t‖₂;
- ``scale/eff_lr/<layer>`` = η_t / ‖w_t‖², the effective learning rate of a scale-invariant
  weight under SGD (the gradient of c·w is ∇/c, so a step moves ŵ by η/‖w‖² times the gradient
  at ŵ);
- ``scale/angle/<layer>`` = angle(w_t, w_{t+1}) in radians (``bnlab.signal.measures.angle``:
  2·atan2(‖ŵ_t − ŵ_{t+1}‖, ‖ŵ_t + ŵ_{t+1}‖), exact for small angles);
- ``scale/angle_ratio/<layer>`` = angle / √(2η_tλ / (1 + α)), the measured angular update over
  its equilibrium (Wan et al. 2021): near 1 once the weight norm has settled;
- ``scale/angle_pred`` = √(2η_tλ / (1 + α)) of the first measured weight's group (bnlab puts all
  parameters in one group).

``eff_lr`` is logged for ``torch.optim.SGD`` only (Adam's step does not scale with the
gradient), ``angle_ratio`` and ``angle_pred`` for SGD with heavy-ball momentum and weight decay
λ > 0 only: the prediction is derived for that case and does not hold for Nesterov momentum
(``optim.nesterov=true``); the norm and angle are logged for every optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bnlab.models import find_slots
from bnlab.nn.stats import statistics_of
from bnlab.nn.weight_std import ScaledWSConv2d, WSConv2d
from bnlab.probes.base import (
    Column,
    Interval,
    Measurements,
    Panel,
    Probe,
    Setup,
    TrainingBatch,
    every,
)
from bnlab.registry import Schema
from bnlab.signal.measures import angle, equilibrium_angle


def scale_invariant_layers(model: nn.Module) -> list[str]:
    """The slot layers (module paths, forward order) whose weight is scale-invariant: without a
    bias before a batch-statistics norm, or weight-standardized (see the module docstring)."""
    found = []
    for slot in find_slots(model):
        layer = model.get_submodule(slot.layer)
        batch_normalized = layer.bias is None and statistics_of(
            model.get_submodule(slot.norm)) is not None
        if batch_normalized or isinstance(layer, WSConv2d | ScaledWSConv2d):
            found.append(slot.layer)
    return found


class ScaleProbe(Probe):
    """Copies the scale-invariant weights after the backward of a due step (``after_backward``)
    and measures the step they took after it (``after_step``)."""

    name = "scale"
    runs = ("after_backward", "after_step")

    class Keys(Schema):
        scale_every: Interval = every(0, "scale invariance: norm, effective learning rate and "
                                      "angular update of each scale-invariant weight against "
                                      "its equilibrium")

    tags: ClassVar[dict[str, str]] = {
        "scale/weight_norm/<module>": "‖w‖₂ of a scale-invariant layer's weight, before the step",
        "scale/eff_lr/<module>": "η / ‖w‖², its effective learning rate (SGD)",
        "scale/angle/<module>": "the angle in radians the step turned w by",
        "scale/angle_ratio/<module>": "that angle over its equilibrium √(2ηλ/(1+α)) (SGD with "
                                      "heavy-ball momentum α and weight decay λ > 0)",
        "scale/angle_pred": "the equilibrium angle √(2ηλ/(1+α)) at the step's learning rate η",
    }
    columns = (Column("scale_angle_ratio", "final angle / equilibrium", "scale/angle_ratio/",
                      steps="last", optional=True),)
    panels = (Panel("scale/angle_ratio/", "angular update /\nequilibrium"),
              Panel("scale/eff_lr/", "effective lr\nη / ‖w‖²", log=True))

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        model, optimizer = setup.model, setup.optimizer
        self.layers = scale_invariant_layers(model)
        self.weights = [model.get_submodule(name).weight for name in self.layers]
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.groups = [groups[id(w)] for w in self.weights]
        self.sgd = isinstance(optimizer, torch.optim.SGD)
        self._before: list[Tensor] | None = None

    def after_backward(self, step: int, batch: TrainingBatch) -> Measurements:
        self.keep_weights()
        return Measurements()

    def after_step(self, step: int) -> Measurements:
        return Measurements(self.measure_step())

    @torch.no_grad()
    def keep_weights(self) -> None:
        """Copy the weights before the step (only on due steps)."""
        self._before = [w.detach().clone() for w in self.weights]

    def _prediction(self, group: dict) -> float | None:
        if not self.sgd or group.get("nesterov") or not group.get("weight_decay"):
            return None
        return equilibrium_angle(group["lr"], group["weight_decay"], group.get("momentum", 0.0))

    @torch.no_grad()
    def measure_step(self) -> dict[str, Tensor | float]:
        """The ``scale/`` scalars of the step just taken (after ``keep_weights``)."""
        if self._before is None:
            return {}
        before, self._before = self._before, None
        scalars: dict[str, Tensor | float] = {}
        for name, w0, w1, group in zip(self.layers, before, self.weights, self.groups,
                                       strict=True):
            norm = torch.linalg.vector_norm(w0.double())
            turned = angle(w0, w1)
            scalars[f"scale/weight_norm/{name}"] = norm
            scalars[f"scale/angle/{name}"] = turned
            if self.sgd:
                scalars[f"scale/eff_lr/{name}"] = group["lr"] / norm.square()
            predicted = self._prediction(group)
            if predicted is not None:
                scalars[f"scale/angle_ratio/{name}"] = turned / predicted
                scalars.setdefault("scale/angle_pred", predicted)
        return scalars
