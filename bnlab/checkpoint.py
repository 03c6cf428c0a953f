"""What a checkpoint holds besides the model and optimizer: the global RNG streams, and reading
a checkpoint back with a one-line error for a truncated or foreign file."""

from __future__ import annotations

from pathlib import Path

import torch

from bnlab.errors import UsageError


def rng_state(device: torch.device) -> dict:
    """The global RNG streams a run draws from (CPU, and the CUDA device's)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at ``path``, tensors on ``device``; only plain data is unpickled
    (``weights_only``: a checkpoint that would run code is refused)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so, don't crash
        raise UsageError(f"cannot resume from {path}: {e.__class__.__name__}: {e}; "
                         "pass overwrite=true to start over") from None
