"""Checks of a composed run config, so a bad value fails in one line before any work starts.

Hydra already rejects unknown keys and group options; this adds types and ranges.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from bnlab.errors import UsageError
from bnlab.models import INITS, MODELS, NORMS


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key -> (test, what is allowed)
Check = tuple[Callable[[object], bool], str]
CHECKS: dict[str, Check] = {
    "seed": (is_int, "an integer"),
    "epochs": (lambda v: is_int(v) and v > 0, "an integer > 0"),
    "batch_size": (lambda v: is_int(v) and v > 1, "an integer > 1 (BN needs 2+ samples)"),
    "eval_batch_size": (lambda v: is_int(v) and v > 0, "an integer > 0"),
    "log_every": (lambda v: is_int(v) and v > 0, "an integer > 0"),
    "threads": (lambda v: v is None or (is_int(v) and v > 0), "null or an integer > 0"),
    "diverge_factor": (lambda v: is_num(v) and v > 1, "a number > 1"),
    "progress": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "compile": (lambda v: isinstance(v, bool), "true or false"),
    "channels_last": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "amp": (lambda v: isinstance(v, bool), "true or false"),
    "deterministic": (lambda v: isinstance(v, bool), "true or false"),
    "overwrite": (lambda v: isinstance(v, bool), "true or false"),
    "resume": (lambda v: isinstance(v, bool), "true or false"),
    "norm.name": (lambda v: v in NORMS, ", ".join(NORMS)),
    "norm.eps": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "norm.momentum": (lambda v: v is None or (is_num(v) and 0 <= v <= 1),
                      "null or a number in [0, 1]"),
    "model.name": (lambda v: v in MODELS, ", ".join(MODELS)),
    "model.init": (lambda v: v in INITS, ", ".join(INITS)),
    "model.dropout": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.conv_dropout": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.name": (lambda v: v in ("sgd", "adam"), "sgd, adam"),
    "optim.lr": (lambda v: is_num(v) and v > 0, "a number > 0"),
    "optim.momentum": (lambda v: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: is_num(v) and v >= 0, "a number >= 0"),
    "sched.name": (lambda v: v in ("constant", "step", "cosine"), "constant, step, cosine"),
    "sched.warmup_epochs": (lambda v: is_num(v) and v >= 0, "a number >= 0"),
    "data.train_size": (lambda v: v is None or (is_int(v) and v > 0), "null or an integer > 0"),
    "data.test_size": (lambda v: v is None or (is_int(v) and v > 0), "null or an integer > 0"),
}

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value and what is allowed."""
    for key, (ok, allowed) in CHECKS.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue  # keys a group option does not have (e.g. conv_dropout for resnet20)
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise UsageError(f"{key}={value!r} is invalid: must be {allowed}")
    if not isinstance(cfg.device, str) or not DEVICE.fullmatch(cfg.device):
        raise UsageError(f"device={cfg.device!r} is invalid: "
                         "must be auto, cpu, cuda, cuda:N or mps")
    from bnlab.probes.config import validate_probe_cfg  # here: probes.config uses is_int

    validate_probe_cfg(cfg.probe)


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"device={name} is not available: this machine has {count} CUDA "
                             "device(s); use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device=mps is not available on this machine; use device=auto or cpu")
    return torch.device(name)
