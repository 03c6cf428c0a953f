"""Gradient-based internal covariate shift (Santurkar et al. 2018, Def. 2.1).

For a watched slot i with W_i the weight of the layer feeding it:
G  = ∇_{W_i} L(W_1, …, W_k) on the training batch, and
G′ = ∇_{W_i} L(W′_1, …, W′_{i−1}, W_i, …, W_k) on the same batch, where W′ are the weights
after the optimizer's real next step (its own class, hyperparameters and state: momentum,
Nesterov, weight decay, Adam moments) taken on a scratch copy.
``ics/l2/<layer>`` = ‖G − G′‖₂ and ``ics/cos/<layer>`` = cos(G, G′) (NaN if either is 0).

"Before i" means: parameters registered before W_i in ``model.named_parameters()``. That is the
forward order for the sequential models (the BN γ/β of earlier slots included); in a ResNet
block the shortcut's parameters come after the main branch's, so they count as later.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

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
from bnlab.probes.functional import LossFn, loss_and_grads
from bnlab.registry import Schema


@torch.no_grad()
def optimizer_update(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Tensor]:
    """Each parameter's value after ``optimizer.step()`` with the current ``.grad``, computed by
    a twin optimizer on copies: the model, its ``.grad`` and the optimizer state are untouched."""
    names = {p: n for n, p in model.named_parameters()}
    copies: dict[Tensor, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            twin = p.detach().clone()
            twin.grad = None if p.grad is None else p.grad.detach().clone()
            copies[p] = twin
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [copies[p] for p in g["params"]]} for g in optimizer.param_groups]
    twin_optimizer = type(optimizer)(groups, **optimizer.defaults)
    # deep copy: load_state_dict would otherwise share (and step) the real momentum buffers
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_optimizer.step()
    return {names[p]: twin for p, twin in copies.items() if p in names}


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum() / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))


def gradient_ics(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 inputs: Tensor, targets: Tensor, layers: list[str],
                 grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ics/l2`` and ``ics/cos`` for each layer in ``layers``; ``grads`` holds G (∇L at the
    current weights, same batch and probe seed) by parameter name."""
    params = dict(model.named_parameters())
    order = list(params)
    updated = optimizer_update(optimizer, model)
    scalars: dict[str, Tensor] = {}
    for layer in layers:
        weight = f"{layer}.weight"
        earlier = order[:order.index(weight)]
        g = grads[weight]
        if earlier:
            shifted = {**params, **{n: updated.get(n, params[n]) for n in earlier}}
            _, (g_shifted,) = loss_and_grads(model, loss_fn, inputs, targets, shifted, [weight])
        else:  # nothing before the first layer moves: G′ = G
            g_shifted = g
        scalars[f"ics/l2/{layer}"] = torch.linalg.vector_norm(g - g_shifted)
        scalars[f"ics/cos/{layer}"] = _cosine(g, g_shifted)
    return scalars


class ICSProbe(Probe):
    """``ics/`` at the watched slot inputs, on the step's training batch."""

    name = "ics"
    runs = ("after_backward",)

    class Keys(Schema):
        ics_every: Interval = every(0, "gradient-based ICS (Santurkar et al. 2018, Def. 2.1)")

    tags: ClassVar[dict[str, str]] = {
        "ics/l2/<layer>": "‖G − G′‖, G′ the gradient of the slot's weight after the earlier "
                          "layers' optimizer step (Santurkar et al. Def. 2.1)",
        "ics/cos/<layer>": "cos(G, G′)",
    }
    columns = (Column("ics_l2", "ICS l2", "ics/l2/", steps="mean"),
               Column("ics_cos", "ICS cos", "ics/cos/", steps="mean"))
    panels = (Panel("ics/l2/", "ICS: grad change\n(ℓ2)"),
              Panel("ics/cos/", "ICS: grad change\n(cosine similarity)"))

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.model, self.optimizer, self.loss_fn = setup.model, setup.optimizer, setup.loss_fn
        self.layers = [s.layer for s in setup.slots if s.layer in setup.watched]

    def due(self, step: int) -> bool:
        return bool(self.layers) and super().due(step)

    def after_backward(self, step: int, batch: TrainingBatch) -> Measurements:
        return Measurements(gradient_ics(self.model, self.optimizer, self.loss_fn, batch.inputs,
                                         batch.targets, self.layers, batch.grads))
