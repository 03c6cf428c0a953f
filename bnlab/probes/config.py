"""The ``probe`` config group, made from the registered probes: its schema (``ProbeConfig``), its
defaults file (``default_yaml``, which ``configs/probe/default.yaml`` holds), and the checks of
a config against the model's slots and the run's length."""

from __future__ import annotations

import logging
import textwrap
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig
from pydantic import Field, create_model

from bnlab.errors import UsageError
from bnlab.models import Slot
from bnlab.probes.base import interval_keys, registered
from bnlab.registry import Schema, check

log = logging.getLogger(__name__)


class SharedKeys(Schema):
    """The keys that are no single probe's."""

    enabled: bool = Field(True, description="measure at all (false: the training loop builds "
                          "no probes; probe=off)")
    batch_size: int = Field(256, ge=2, description="images in the fixed probe batch, from the "
                            "test split (never trained on): >= 2")
    act_seed: Literal["fixed", "step"] = Field(
        "fixed", description="RNG of the probe batch's forward (act, white, bnstats): fixed, "
        "the same dropout masks and BN noise every probe (drift = what the weights did); step, "
        "a new draw each probe (drift also shows injected noise: noisy BN, dropout)")
    layers: Literal["all"] | list[str] = Field(
        "all", description="`all` norm slots (input and output), or a list of their module "
        "paths; ICS is measured at the watched slot inputs (conv/linear layers)")


def _schema() -> type[Schema]:
    """The shared keys and every probe's ``Keys`` in one schema, their cross-key rules
    included (pydantic runs every base's validators)."""
    parts = [SharedKeys, *(probe.Keys for probe in registered())]
    twice = [k for k, n in Counter(k for p in parts for k in p.model_fields).items() if n > 1]
    if twice:
        raise TypeError(f"probe keys declared twice: {', '.join(twice)}")
    # pydantic lists the fields of the last base first: reversed, they read in run order
    schema = create_model("ProbeConfig", __base__=tuple(reversed(parts)), __module__=__name__)
    schema.__doc__ = "The ``probe`` group's keys: the shared ones, then each probe's."
    return schema


ProbeConfig = _schema()


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


def validate_probe_cfg(cfg: DictConfig, slots: Sequence[Slot] | None = None) -> Any:
    """The validated ``probe`` config (a ``ProbeConfig``); raise ``UsageError`` naming the first
    bad ``probe.*`` value and what is allowed. ``probe.layers`` is checked against the model's
    slots when they are given."""
    config = check(ProbeConfig, cfg, "probe")
    if slots is not None:
        watched_layers(config.layers, slots)
    return config


def warn_long_intervals(cfg: DictConfig, total_steps: int) -> None:
    """Log a warning for each interval longer than the run: that measurement never happens,
    or, on the probe batch, only at step 0."""
    for probe in registered():
        for key in interval_keys(probe):
            if cfg[key] > total_steps:
                what = "measured at step 0 only" if "probe_batch" in probe.runs else \
                    "not measured"
                log.warning("probe.%s=%d is longer than this run (%d steps): %s is %s", key,
                            cfg[key], total_steps, key.removesuffix("_every"), what)


HEADER = """\
# Probes of the training step (bnlab/probes): what is measured and how often, in optimizer
# steps; 0 turns a measurement off. Tags: README.md, "TensorBoard tags"; exact definitions in
# the docstrings of bnlab/probes/*.py; costs: docs/benchmarks.md (scripts/bench_probes.py).
# Written from the probes' declarations by `python -m tests.test_probe_plugin`: edit those.
"""
COMMENT_COLUMN = 25


def default_yaml() -> str:
    """``configs/probe/default.yaml``: every key with its default and its description."""
    lines = [HEADER.rstrip("\n")]
    for key, field in ProbeConfig.model_fields.items():
        # (a scalar's YAML document ends in "...")
        value = yaml.safe_dump(field.default, default_flow_style=True).removesuffix("...\n")
        entry = f"{key}: {value.strip()}"
        comment = textwrap.wrap(field.description or "", 100 - COMMENT_COLUMN - 2)
        if not comment:
            lines.append(entry)
            continue
        lines.append(f"{entry:<{COMMENT_COLUMN - 1}} # {comment[0]}")
        lines += [f"{'':<{COMMENT_COLUMN - 1}} # {line}" for line in comment[1:]]
    return "\n".join(lines) + "\n"
