"""Per-slot placement: building a model whose slots hold different norms (``norm.slots``).

A builder asks its norm factory for one slot module after another, in forward order, and
cannot know a slot's module path while it builds. So a placed build takes two passes: the
model is first built on the meta device with empty slots (no memory, no compute, no RNG draw)
to learn its slots' paths and which of them a conv feeds; the norm option maps those to one
factory per slot (``for_slots``, e.g. DBN in the first slot and BN in all others); the model is
then built for real with a factory that hands out those in turn. The feeding layers' biases
follow from the slot modules themselves (``slots.conv_slot``), so each layer keeps its bias
exactly where its own slot is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from bnlab.models.slots import NormFactory, find_slots


@runtime_checkable
class PlacedNorm(Protocol):
    """A norm factory with a placement (a ``bnlab.norms`` option): ``slots == "all"`` fills
    every slot with itself; otherwise ``for_slots`` gives the factory of each slot."""

    slots: object

    def __call__(self, num_features: int, dims: int) -> nn.Module: ...

    def for_slots(self, paths: Sequence[str], conv_fed: Sequence[bool]
                  ) -> list[NormFactory]: ...


def _empty_slot(num_features: int, dims: int) -> nn.Module:
    slot = nn.Identity()
    slot.is_norm_slot = True
    return slot


def slot_layout(make: Callable[[NormFactory], nn.Module]) -> tuple[list[str], list[bool]]:
    """The slot paths of the model ``make`` builds, in forward order, and whether a conv feeds
    each (built on the meta device with empty slots)."""
    with torch.device("meta"):
        model = make(_empty_slot)
    slots = find_slots(model)
    return ([s.norm for s in slots],
            [isinstance(model.get_submodule(s.layer), nn.Conv2d) for s in slots])


def build_placed(make: Callable[[NormFactory], nn.Module], norm: NormFactory) -> nn.Module:
    """``make(factory)`` with each slot filled as ``norm``'s placement says (a plain factory,
    or ``slots == "all"``: every slot from ``norm``)."""
    if not isinstance(norm, PlacedNorm) or norm.slots == "all":
        return make(norm)
    paths, conv_fed = slot_layout(make)
    factories = norm.for_slots(paths, conv_fed)
    made: list[nn.Module] = []

    def next_slot(num_features: int, dims: int) -> nn.Module:
        slot = factories[len(made)](num_features, dims)
        made.append(slot)
        return slot

    model = make(next_slot)
    built = find_slots(model)
    # Each factory must have filled the slot it was planned for: the builder asked for its
    # slots in forward (module) order.
    if [s.norm for s in built] != paths or len(made) != len(built) or any(
            model.get_submodule(s.norm) is not m for s, m in zip(built, made, strict=True)):
        raise RuntimeError("the model's builder made its norm slots out of module order; "
                           "per-slot placement needs them in forward order")
    return model
