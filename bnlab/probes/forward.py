"""The probe forward: one train-mode pass of the fixed probe batch that several probes observe.

The activation, whiteness and statistics-mismatch probes all look at what the network computes
on the probe batch; each attaches its own hooks (an *observer*) and they share one forward
when they are due at the same step, so adding a probe adds no forward pass. The forward runs
in train mode (each norm layer normalizes with the probe batch's own statistics, as the next
layer sees it in training), without autocast, under a seeded RNG and inside ``read_only``, so
the run never sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.probes.readonly import fixed_rng, read_only


class Observer(Protocol):
    """A probe that records what it needs during the probe forward through hooks."""

    def attach(self) -> list[RemovableHandle]:
        """Register this probe's hooks for the next forward; the caller removes them."""
        ...


@torch.no_grad()
def probe_forward(model: nn.Module, inputs: Tensor, seed: int,
                  observers: Sequence[Observer]) -> None:
    """One train-mode forward of ``inputs`` with every observer's hooks attached, read-only,
    with the global RNG seeded with ``seed`` (dropout masks and BN noise) and autocast off."""
    handles: list[RemovableHandle] = []
    try:
        for observer in observers:
            handles += observer.attach()
        with (read_only(model), fixed_rng(inputs.device, seed),
              torch.autocast(inputs.device.type, enabled=False)):
            model.train()
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
