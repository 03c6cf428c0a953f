"""Observers of a training step. Each returns numbers; none changes the run.

A probe is one module here with a ``base.Probe`` subclass that declares its name, config keys,
where in the step it runs, its tags and optionally its ``bnlab compare`` columns and ``bnlab
plot`` panels (``base`` says how); ``base.PROBES`` lists the modules, in the order the probes
run at each point of the step and in which their keys, columns and panels are listed.

The training loop builds one ``Probes`` (only when ``probe.enabled``) and calls it at fixed
points of every step; at a step where nothing is due a call returns empty ``Measurements`` at
once. Tags follow ``<group>/<measure>/<module path>``. All probe forwards run in train mode
under a seeded RNG (fixed, or for the probe batch's forward optionally by step), with the
model's buffers, flags and RNG streams restored afterwards (``readonly``). The probes of the
fixed probe batch observe one shared forward of it (``forward``), whichever of them are due.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from bnlab.models import Slot
from bnlab.probes.base import Measurements, Probe, Setup, TrainingBatch, registered
from bnlab.probes.config import validate_probe_cfg, warn_long_intervals, watched_layers
from bnlab.probes.forward import probe_forward
from bnlab.probes.functional import LossFn
from bnlab.probes.readonly import PROBE_SEED

__all__ = ["Measurements", "Probes", "validate_probe_cfg", "warn_long_intervals"]


def _state_key(probe: Probe) -> str:
    """A probe's key in the checkpoint: its module's name, as one module is one probe."""
    return type(probe).__module__.rsplit(".", 1)[-1]


class Probes:
    """The probes of one run, configured by the ``probe`` config group."""

    def __init__(self, cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: LossFn, probe_batch: tuple[Tensor, Tensor], slots: list[Slot]) -> None:
        config = validate_probe_cfg(cfg, slots)
        self.model, self.loss_fn = model, loss_fn
        self.inputs = probe_batch[0]
        self.seed_by_step = config.act_seed == "step"
        setup = Setup(model, optimizer, loss_fn, self.inputs, list(slots),
                      watched_layers(config.layers, slots))
        self.probes = [probe(config, setup) for probe in registered()]
        self.at = {where: [p for p in self.probes if where in p.runs]
                   for where in ("after_backward", "probe_batch", "after_step")}

    def start(self) -> Measurements:
        """Step 0, before training: the probe-batch probes of the initial network (the
        activations' drift references among them)."""
        return self._probe_batch(0)

    def after_backward(self, step: int, inputs: Tensor, targets: Tensor) -> Measurements:
        """After ``loss.backward()``, before ``optimizer.step()`` (``step`` is 1-based): the
        probes of the training batch that are due."""
        m = Measurements()
        due = [p for p in self.at["after_backward"] if p.due(step)]
        if due:
            with TrainingBatch(self.model, self.loss_fn, inputs, targets) as batch:
                for probe in due:
                    m.update(probe.after_backward(step, batch))
        return m

    def after_step(self, step: int) -> Measurements:
        """After ``optimizer.step()`` (``step`` steps done): the probes of the fixed probe
        batch, then those of the step just taken, that are due."""
        m = self._probe_batch(step)
        for probe in self.at["after_step"]:
            if probe.due(step):
                m.update(probe.after_step(step))
        return m

    def _probe_batch(self, step: int) -> Measurements:
        """The probe-batch probes that are due (at step 0 each whose interval is > 0), from one
        forward of the probe batch."""
        m = Measurements()
        due = [p for p in self.at["probe_batch"] if p.due(step)]
        if due:
            seed = PROBE_SEED + step if self.seed_by_step else PROBE_SEED
            probe_forward(self.model, self.inputs, seed, due)
            for probe in due:
                m.update(probe.measure(step))
        return m

    def state_dict(self) -> dict:
        """What the probes need to continue after a resume (the activations' drift references:
        first and previous probe statistics), as tensors."""
        return {_state_key(p): state for p in self.probes
                if (state := p.state_dict()) is not None}

    def load_state_dict(self, state: dict) -> None:
        for probe in self.probes:
            if _state_key(probe) in state:
                probe.load_state_dict(state[_state_key(probe)])
