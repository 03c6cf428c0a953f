"""Gradient and update statistics, cheap enough for every step.

Each quantity is one multi-tensor (``torch._foreach_*``) computation stacked into one tensor,
so there are a handful of kernels and no host sync; the tags are 0-d views into that tensor.

- ``grad/norm/<param>``: ‖∇L‖₂ of each parameter tensor (as the optimizer will see it);
- ``grad/global_norm``: ‖∇L‖₂ over all parameters;
- ``grad/nonfinite``: the fraction of gradient values that are NaN or ±inf;
- ``opt/weight_norm/<param>``: ‖w‖₂ after the step;
- ``opt/update_ratio/<param>``: ‖w_after − w_before‖₂ / ‖w_before‖₂, the relative step size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from bnlab.probes.base import Column, Interval, Measurements, Probe, Setup, TrainingBatch, every
from bnlab.registry import Schema


def _stacked_norms(tensors: list[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors))


def _nonfinite_fraction(grads: list[Tensor], global_norm: Tensor) -> Tensor:
    # All values are finite when the norm is, so on CPU (where reading a value costs no sync)
    # a finite norm saves the pass that counts; on an accelerator, count without a sync.
    if global_norm.device.type == "cpu" and bool(global_norm.isfinite()):
        return torch.zeros((), device=global_norm.device)
    flat = torch.cat([g.reshape(-1) for g in grads])
    # count in int64: a float 1 − finite/numel would round small fractions of big models away
    return (flat.numel() - flat.isfinite().sum()) / flat.numel()


class GradientProbe(Probe):
    """Gradient norms on the step's ``.grad`` after backward; weight norms and update ratios of
    the step after it (the weights are copied before the step only at steps that measure)."""

    name = "grad"
    runs = ("after_backward", "after_step")

    class Keys(Schema):
        grad_every: Interval = every(1, "gradient norms, non-finite fraction, weight norms, "
                                     "update ratios")

    tags: ClassVar[dict[str, str]] = {
        "grad/norm/<param>": "‖∇L‖₂ of each parameter tensor, as the optimizer sees it",
        "grad/global_norm": "‖∇L‖₂ over all parameters",
        "grad/nonfinite": "fraction of gradient values that are NaN or ±inf",
        "opt/weight_norm/<param>": "‖w‖₂ after the step",
        "opt/update_ratio/<param>": "‖Δw‖ / ‖w before the step‖, the relative step size",
    }
    columns = (Column("peak_grad_norm", "peak grad norm", "grad/global_norm", steps="max"),)

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        named = [(n, p) for n, p in setup.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._before: list[Tensor] | None = None

    def after_backward(self, step: int, batch: TrainingBatch) -> Measurements:
        scalars = self.gradients()
        self.keep_weights()
        return Measurements(scalars)

    def after_step(self, step: int) -> Measurements:
        return Measurements(self.updates())

    @torch.no_grad()
    def gradients(self) -> dict[str, Tensor]:
        """Gradient norms and the non-finite fraction of the ``.grad`` the step will use."""
        with_grad = [(n, p.grad) for n, p in zip(self.names, self.params, strict=True)
                     if p.grad is not None]
        if not with_grad:
            return {}
        names = [n for n, _ in with_grad]
        grads = [g for _, g in with_grad]
        norms = _stacked_norms(grads)
        global_norm = torch.linalg.vector_norm(norms)
        scalars = {f"grad/norm/{n}": v for n, v in zip(names, norms.unbind(), strict=True)}
        scalars["grad/global_norm"] = global_norm
        scalars["grad/nonfinite"] = _nonfinite_fraction(grads, global_norm)
        return scalars

    @torch.no_grad()
    def keep_weights(self) -> None:
        """Copy the weights before the step, for the update ratio (only on due steps)."""
        self._before = torch._foreach_mul(self.params, 1.0)  # one fused copy

    @torch.no_grad()
    def updates(self) -> dict[str, Tensor]:
        """Weight norms and update ratios of the step just taken (after ``keep_weights``)."""
        if self._before is None:
            return {}
        before, self._before = self._before, None
        weight = _stacked_norms(self.params)
        ratio = (_stacked_norms(torch._foreach_sub(self.params, before))
                 / _stacked_norms(before))
        scalars = {f"opt/weight_norm/{n}": v
                   for n, v in zip(self.names, weight.unbind(), strict=True)}
        scalars.update({f"opt/update_ratio/{n}": v
                        for n, v in zip(self.names, ratio.unbind(), strict=True)})
        return scalars
