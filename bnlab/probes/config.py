"""Checks of the ``probe`` config group, so a bad value fails in one line before training."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig

from bnlab.config import is_int, is_num
from bnlab.errors import UsageError
from bnlab.models import Slot

INTERVALS = ("act_every", "hist_every", "grad_every", "ics_every", "landscape_every")


def _invalid(key: str, value: object, allowed: str) -> UsageError:
    return UsageError(f"probe.{key}={value!r} is invalid: must be {allowed}")


def _check_int(cfg: DictConfig, key: str, minimum: int) -> None:
    value = cfg.get(key)
    if not is_int(value) or value < minimum:
        raise _invalid(key, value, f"an integer >= {minimum}")


def _check_range(cfg: DictConfig) -> None:
    value = cfg.get("landscape_range")
    ok = (isinstance(value, (list, tuple, ListConfig)) and len(value) == 2
          and all(is_num(v) for v in value) and 0 < value[0] < value[1])
    if not ok:
        shown = list(value) if isinstance(value, ListConfig) else value
        raise _invalid("landscape_range", shown, "[low, high] with 0 < low < high "
                       "(multiples of the base learning rate)")


def watched_layers(layers: object, slots: Sequence[Slot]) -> list[str]:
    """The module paths ``probe.layers`` selects, in forward order: ``all`` is every slot's
    input (``slot.layer``) and output (``slot.norm``); a list must name only those."""
    allowed = [name for slot in slots for name in (slot.layer, slot.norm)]
    if layers == "all":
        return allowed
    if not isinstance(layers, (list, tuple, ListConfig)):
        raise _invalid("layers", layers, "all or a list of module paths")
    unknown = [name for name in layers if name not in allowed]
    if unknown:
        raise UsageError(f"probe.layers: {', '.join(map(repr, unknown))} is not a watched "
                         f"position; allowed: all, {', '.join(allowed)}")
    return [name for name in allowed if name in layers]


def validate_probe_cfg(cfg: DictConfig, slots: Sequence[Slot] | None = None) -> None:
    """Raise ``UsageError`` naming the first bad ``probe.*`` value and what is allowed.
    ``probe.layers`` is checked against the model's slots when they are given."""
    if not isinstance(cfg.get("enabled"), bool):
        raise _invalid("enabled", cfg.get("enabled"), "true or false")
    _check_int(cfg, "batch_size", 2)  # train-mode BN needs two samples per channel
    for key in INTERVALS:
        _check_int(cfg, key, 0)
    _check_int(cfg, "hist_samples", 1)
    _check_int(cfg, "landscape_points", 2)
    act, hist = cfg.act_every, cfg.hist_every
    if hist and (not act or hist % act):
        # histograms are drawn from the activation probe's forward pass
        raise _invalid("hist_every", hist, f"0 or a multiple of probe.act_every={act}")
    if cfg.get("act_seed") not in ("fixed", "step"):
        raise _invalid("act_seed", cfg.get("act_seed"), "fixed or step")
    _check_range(cfg)
    if slots is not None:
        watched_layers(cfg.get("layers"), slots)
