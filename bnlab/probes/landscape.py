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

import torch
from torch import Tensor, nn

from bnlab.probes.functional import LossFn, loss_and_grads


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
