"""Observers of a training step. Each returns numbers; none changes the run.

The training loop builds one ``Probes`` (only when ``probe.enabled``) and calls it at fixed
points of every step; at a step where nothing is due a call returns empty ``Measurements`` at
once. Tags follow ``<group>/<measure>/<module path>``; the definitions are in the submodules:
``activations`` (``act/``, ``drift/``), ``whiteness`` (``white/``), ``bnstats`` (``bnstats/``),
``gradients`` (``grad/``, ``opt/``), ``ics`` (``ics/``) and ``landscape`` (``landscape/``).
All probe forwards run in train mode under a seeded RNG (fixed, or for the probe batch's
forward optionally by step), with the model's buffers, flags and RNG streams restored afterwards
(``readonly``). The activation, whiteness and statistics-mismatch probes observe one shared
forward of the fixed probe batch (``forward``), whichever of them are due.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from bnlab.models import Slot
from bnlab.probes.activations import ActivationProbe
from bnlab.probes.bnstats import StatsMismatchProbe
from bnlab.probes.config import validate_probe_cfg, watched_layers
from bnlab.probes.forward import probe_forward
from bnlab.probes.functional import LossFn, loss_and_grads
from bnlab.probes.gradients import GradientProbe
from bnlab.probes.ics import gradient_ics
from bnlab.probes.landscape import loss_landscape, step_sizes
from bnlab.probes.readonly import PROBE_SEED, read_only
from bnlab.probes.whiteness import WhitenessProbe

__all__ = ["Measurements", "Probes", "validate_probe_cfg"]


@dataclass
class Measurements:
    scalars: dict[str, Tensor | float] = field(default_factory=dict)  # tag -> 0-d tensor/float
    histograms: dict[str, Tensor] = field(default_factory=dict)       # tag -> 1-D values


def _due(every: int, step: int) -> bool:
    return every > 0 and step % every == 0


class Probes:
    """The probes of one run, configured by the ``probe`` config group."""

    def __init__(self, cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn, probe_batch: tuple[Tensor, Tensor], slots: list[Slot]) -> None:
        validate_probe_cfg(cfg, slots)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        # plain ints: reading a DictConfig costs microseconds, and these are read every step
        self.act_every, self.hist_every = int(cfg.act_every), int(cfg.hist_every)
        self.grad_every, self.ics_every = int(cfg.grad_every), int(cfg.ics_every)
        self.landscape_every = int(cfg.landscape_every)
        self.white_every, self.bnstats_every = int(cfg.white_every), int(cfg.bnstats_every)
        self.landscape_range = (float(cfg.landscape_range[0]), float(cfg.landscape_range[1]))
        self.landscape_points = int(cfg.landscape_points)
        watched = watched_layers(cfg.layers, slots)
        self.ics_layers = [s.layer for s in slots if s.layer in watched]
        self.inputs = probe_batch[0]
        self.seed_by_step = cfg.act_seed == "step"
        self.activations = ActivationProbe(model, watched, int(cfg.hist_samples),
                                           self.inputs.device)
        self.whiteness = WhitenessProbe(model, watched)
        self.bnstats = StatsMismatchProbe(model)
        self.gradients = GradientProbe(model)

    def start(self) -> Measurements:
        """Step 0, before training: the baseline activations (the drift references), and the
        whiteness and statistics mismatch of the initial network."""
        return self._probe_batch(0)

    def after_backward(self, step: int, inputs: Tensor, targets: Tensor) -> Measurements:
        """After ``loss.backward()``, before ``optimizer.step()`` (``step`` is 1-based):
        gradient norms, gradient-based ICS and the loss landscape on the training batch."""
        m = Measurements()
        if _due(self.grad_every, step):
            m.scalars.update(self.gradients.gradients())
            self.gradients.keep_weights()
        ics = _due(self.ics_every, step) and bool(self.ics_layers)
        landscape = _due(self.landscape_every, step)
        if ics or landscape:
            m.scalars.update(self._second_order(inputs, targets, ics, landscape))
        return m

    def after_step(self, step: int) -> Measurements:
        """After ``optimizer.step()`` (``step`` steps done): update ratios, weight norms, and
        the probes of the fixed probe batch."""
        m = self._probe_batch(step)
        m.scalars.update(self.gradients.updates())
        return m

    def _probe_batch(self, step: int) -> Measurements:
        """Activations, whiteness and statistics mismatch, those that are due (step 0 is due
        whenever an interval is > 0), from one forward of the probe batch."""
        act = _due(self.act_every, step)
        white = _due(self.white_every, step)
        bnstats = _due(self.bnstats_every, step) and bool(self.bnstats.layers)
        observers = [o for o, due in ((self.activations, act), (self.whiteness, white),
                                      (self.bnstats, bnstats)) if due]
        if not observers:
            return Measurements()
        seed = PROBE_SEED + step if self.seed_by_step else PROBE_SEED
        probe_forward(self.model, self.inputs, seed, observers)
        m = Measurements()
        if act:
            m.scalars, m.histograms = self.activations.measure(_due(self.hist_every, step))
        if white:
            m.scalars.update(self.whiteness.measure())
        if bnstats:
            m.scalars.update(self.bnstats.measure())
        return m

    def _second_order(self, inputs: Tensor, targets: Tensor, ics: bool,
                      landscape: bool) -> dict[str, Tensor]:
        """ICS and landscape share ∇L at the current weights, computed in the probe's own
        forward (train mode, fixed seed, no autocast) so G and G′ differ only by the weights."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        scalars: dict[str, Tensor] = {}
        with read_only(self.model):
            self.model.train()
            _, grads = loss_and_grads(self.model, self.loss_fn, inputs, targets, params,
                                      list(params))
            by_name = dict(zip(params, grads, strict=True))
            if ics:
                scalars.update(gradient_ics(self.model, self.optimizer, self.loss_fn, inputs,
                                            targets, self.ics_layers, by_name))
            if landscape:
                # The base lr, not the scheduled one: step sizes stay the same all run, so the
                # landscape curve compares like with like (and does not collapse to η = 0 as a
                # cosine schedule ends).
                base_lr = float(self.optimizer.defaults["lr"])
                etas = step_sizes(base_lr, *self.landscape_range, self.landscape_points)
                scalars.update(loss_landscape(self.model, self.loss_fn, inputs, targets,
                                              by_name, etas))
        return scalars

    def state_dict(self) -> dict:
        """The drift references (first and previous probe statistics), as tensors."""
        return {"activations": self.activations.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.activations.load_state_dict(state["activations"])
