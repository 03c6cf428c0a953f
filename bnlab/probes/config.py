"""Checks of the ``probe`` config group against its schema and the model's slots."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig

from bnlab.config import ProbeConfig
from bnlab.errors import UsageError
from bnlab.models import Slot
from bnlab.registry import check


def watched_layers(layers: object, slots: Sequence[Slot]) -> list[str]:
    """The module paths ``probe.layers`` selects, in forward order: ``all`` is every slot's
    input (``slot.layer``) and output (``slot.norm``); a list must name only those."""
    allowed = [name for slot in slots for name in (slot.layer, slot.norm)]
    if layers == "all":
        return allowed
    if not isinstance(layers, (list, tuple, ListConfig)):
        raise UsageError(f"probe.layers={layers!r} is invalid: must be all or a list of "
                         "module paths")
    unknown = [name for name in layers if name not in allowed]
    if unknown:
        raise UsageError(f"probe.layers: {', '.join(map(repr, unknown))} is not a watched "
                         f"position; allowed: all, {', '.join(allowed)}")
    return [name for name in allowed if name in layers]


def validate_probe_cfg(cfg: DictConfig, slots: Sequence[Slot] | None = None) -> None:
    """Raise ``UsageError`` naming the first bad ``probe.*`` value and what is allowed (the
    schema is ``bnlab.config.ProbeConfig``); ``probe.layers`` is checked against the model's
    slots when they are given."""
    check(ProbeConfig, cfg, "probe")
    if slots is not None:
        watched_layers(cfg.get("layers"), slots)
