"""Where in a model the signal is measured: the norm slots, the residual blocks, and the layers
whose weight gradients are taken, each with its depth index, found from the model's structure.

- A **slot** (``bnlab.models.find_slots``) gives two positions: its input, the output of the
  conv/linear layer that feeds it (``slot_input``, tagged with that layer's path), and its output,
  the input to the nonlinearity (``slot_output``, tagged with the slot's path). Slot l (1-based,
  forward order) has depth index l.
- A **residual block** is a module whose output is the sum of a residual branch and a skip
  path (through a ReLU in post-activation blocks). It is found by the parts every block of
  ``bnlab.models.resnet`` has: a child ``branch_end`` (an identity that receives the branch's
  output as it is added, after any SkipInit/Fixup/NF scalars) and a child ``shortcut`` (the
  skip path). Its output is a ``block_output`` position; block b (1-based, forward order) has
  depth index b.
- The **gradient layers** are the slots' layers, weight ``<layer>.weight``, depth index l.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from bnlab.models import find_slots

KINDS = ("slot_input", "slot_output", "block_output")
# Where the sample Gram matrix is taken: the signal each layer and block hands on. (A slot's
# output is its input normalized; the next slot's input is what the network made of it.)
GRAM_KINDS = ("slot_input", "block_output")


@dataclass(frozen=True)
class Position:
    """One measured activation: the output of module ``name``."""

    name: str
    kind: str   # one of KINDS
    index: int  # depth index, 1-based, within its kind

    @property
    def gram(self) -> bool:
        """Whether the sample Gram measures are taken here (``GRAM_KINDS``)."""
        return self.kind in GRAM_KINDS


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block at ``name``; ``branch`` and ``shortcut`` are the module paths whose
    outputs are the residual branch (as it is added) and the skip path."""

    name: str
    branch: str
    shortcut: str
    index: int


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """The model's residual blocks in module order (forward order for the models here)."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "branch_end" in children and "shortcut" in children:
            prefix = f"{name}." if name else ""
            found.append(ResidualBlock(name, f"{prefix}branch_end", f"{prefix}shortcut",
                                       len(found) + 1))
    return found


def positions(model: nn.Module) -> list[Position]:
    """Every measured position: slot inputs and outputs, then block outputs."""
    slots = find_slots(model)
    return ([Position(s.layer, "slot_input", i) for i, s in enumerate(slots, 1)]
            + [Position(s.norm, "slot_output", i) for i, s in enumerate(slots, 1)]
            + [Position(b.name, "block_output", b.index) for b in residual_blocks(model)])


def gradient_layers(model: nn.Module) -> list[str]:
    """The weights whose gradient norms are taken, in depth order: each slot's layer's."""
    return [f"{slot.layer}.weight" for slot in find_slots(model)]
