"""The loss landscape along the gradient (Santurkar et al. 2018, Sec. 3.1).

At the current weights w with g = ∇L(w) (all parameters, the loss without weight decay, on the
training batch under the fixed probe seed), for ``landscape_points`` step sizes η evenly spaced
in ``landscape_range`` × the base learning rate ``optim.lr`` (η = 0 not included; the same
η all run, whatever the schedule does):

- ``landscape/loss_range`` = max_η L(w − ηg) − min_η L(w − ηg)        ("loss variation");
- ``landscape/grad_pred``  = max_η ‖∇L(w) − ∇L(w − ηg)‖ − min_η of the same
                                                                 ("gradient predictiveness");
- ``landscape/beta``       = max_η ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖   ("effective β-smoothness").
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from bnlab.probes.base import Interval, Measurements, Probe, Setup, TrainingBatch, every
from bnlab.probes.functional import LossFn, loss_and_grads
from bnlab.registry import Schema


def step_sizes(lr: float, low: float, high: float, points: int) -> list[float]:
    return torch.linspace(low * lr, high * lr, points, dtype=torch.float64).tolist()


def _global_norm(tensors: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def loss_landscape(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                   grads: dict[str, Tensor], etas: list[float]) -> dict[str, Tensor]:
    """The three landscape numbers; ``grads`` is ∇L(w) by parameter name."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in grads}
    g = [grads[n] for n in params]
    losses, diffs = [], []
    for eta in etas:
        moved = {n: (p - eta * gn).requires_grad_()
                 for (n, p), gn in zip(params.items(), g, strict=True)}
        loss, g_moved = loss_and_grads(model, loss_fn, inputs, targets, moved, list(moved))
        losses.append(loss)
        diffs.append(_global_norm(torch._foreach_sub(g, g_moved)))
    loss_t, diff_t = torch.stack(losses), torch.stack(diffs)
    step = torch.tensor(etas, device=diff_t.device) * _global_norm(g)
    return {"landscape/loss_range": loss_t.max() - loss_t.min(),
            "landscape/grad_pred": diff_t.max() - diff_t.min(),
            "landscape/beta": (diff_t / step).max()}


class LandscapeProbe(Probe):
    """``landscape/`` on the step's training batch."""

    name = "landscape"
    runs = ("after_backward",)

    class Keys(Schema):
        landscape_every: Interval = every(0, "loss landscape along the gradient (Santurkar et "
                                          "al. 2018, Sec. 3.1)")
        landscape_range: list[Annotated[float, Field(gt=0)]] = Field(
            [0.5, 4.0], min_length=2, max_length=2,
            description="step sizes η, in multiples of the base learning rate optim.lr: "
            "[low, high], 0 < low < high")
        landscape_points: int = Field(8, ge=2, description="η values evenly spaced in "
                                      "landscape_range: >= 2")

        @model_validator(mode="after")
        def _range_low_high(self) -> Self:
            low, high = self.landscape_range
            if low >= high:
                raise ValueError(f"landscape_range={[low, high]} must be [low, high] with "
                                 "low < high (multiples of the base learning rate)")
            return self

    tags: ClassVar[dict[str, str]] = {
        "landscape/loss_range": "max − min over η of L(w − ηg): loss variation (Santurkar et "
                                "al. Sec. 3.1)",
        "landscape/grad_pred": "max − min over η of ‖∇L(w) − ∇L(w − ηg)‖: gradient "
                               "predictiveness",
        "landscape/beta": "max over η of ‖∇L(w) − ∇L(w − ηg)‖ / ‖ηg‖: effective β-smoothness",
    }

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.model, self.optimizer, self.loss_fn = setup.model, setup.optimizer, setup.loss_fn
        self.range = (float(cfg.landscape_range[0]), float(cfg.landscape_range[1]))
        self.points = cfg.landscape_points

    def after_backward(self, step: int, batch: TrainingBatch) -> Measurements:
        # The base lr, not the scheduled one: step sizes stay the same all run, so the
        # landscape curve compares like with like (and does not collapse to η = 0 as a
        # cosine schedule ends).
        base_lr = float(self.optimizer.defaults["lr"])
        etas = step_sizes(base_lr, *self.range, self.points)
        return Measurements(loss_landscape(self.model, self.loss_fn, batch.inputs, batch.targets,
                                           batch.grads, etas))
