"""The norm-slot convention every model follows, the layers that feed slots, and finding them.

A *norm slot* sits between a conv (or hidden linear) layer and the nonlinearity after it, as
in Ioffe & Szegedy (2015): layer → slot → ReLU. The slot module comes from a norm factory,
``norm(num_features, dims)`` (``dims`` 2 after a conv, 1 after a linear layer), and carries
the mark ``is_norm_slot = True`` (the ``bnlab.norms`` options set it), so :func:`find_slots`
finds it even when it is empty. An empty slot is an ``nn.Identity``. The layer feeding a slot
has a bias exactly when its slot is empty (a norm's β replaces it), so the watched positions
are the same modules whatever the norm, and a mixed model (``norm.slots``) has a bias before
each empty slot only.

``weight_std`` (the option ``model.weight_std``) picks the conv class of every slot-feeding
conv: ``none`` ``nn.Conv2d``, ``ws`` :class:`~bnlab.nn.WSConv2d`, ``scaled``
:class:`~bnlab.nn.ScaledWSConv2d`. Linear layers stay ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from bnlab.nn.weight_std import ScaledWSConv2d, WSConv2d

NormFactory = Callable[[int, int], nn.Module]
"""``factory(num_features, dims)`` returns the module for one norm slot (dims 1 or 2); an
``nn.Identity`` is an empty slot. A ``bnlab.norms`` option is such a factory (with a
placement, ``norm.slots``, that ``bnlab.models.placement`` applies)."""

CONV_CLASSES: dict[str, type[nn.Conv2d]] = {"none": nn.Conv2d, "ws": WSConv2d,
                                            "scaled": ScaledWSConv2d}


@dataclass(frozen=True)
class Slot:
    """One watched norm slot: ``layer`` feeds it (its output is the slot's input) and ``norm``
    is the slot module itself (its output is the input to the nonlinearity)."""

    layer: str
    norm: str


def is_empty(slot: nn.Module) -> bool:
    return isinstance(slot, nn.Identity)


def conv_slot(cin: int, cout: int, norm: NormFactory, weight_std: str = "none", *,
              kernel_size: int = 3, stride: int = 1, after_relu: bool = True,
              bias: bool | None = None) -> tuple[nn.Conv2d, nn.Module]:
    """A conv (``padding=kernel_size // 2``) and the slot it feeds, biased only before an empty
    slot (``bias=False`` for an architecture with biases of its own: Fixup's scalars).
    ``after_relu=False`` for a conv whose input is not a ReLU's output (the first conv, on the
    image): Scaled WS then leaves out the ReLU gain."""
    slot = norm(cout, 2)
    extra = {"gamma": 1.0} if weight_std == "scaled" and not after_relu else {}
    conv = CONV_CLASSES[weight_std](
        cin, cout, kernel_size, stride=stride, padding=kernel_size // 2,
        bias=is_empty(slot) if bias is None else bias, **extra)
    return conv, slot


def linear_slot(fin: int, fout: int, norm: NormFactory) -> tuple[nn.Linear, nn.Module]:
    """A hidden linear layer and the slot it feeds, biased only before an empty slot."""
    slot = norm(fout, 1)
    return nn.Linear(fin, fout, bias=is_empty(slot)), slot


def find_slots(model: nn.Module) -> list[Slot]:
    """The model's norm slots in forward order, each with the conv/linear layer that feeds it."""
    slots, last_layer = [], None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last_layer = name
        elif getattr(module, "is_norm_slot", False) and last_layer is not None:
            slots.append(Slot(layer=last_layer, norm=name))
    return slots
