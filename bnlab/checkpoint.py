"""What a checkpoint holds besides the model and optimizer: the global RNG streams (every rank's,
in a data-parallel run), and reading a checkpoint back with a one-line error for a truncated or
foreign file."""

from __future__ import annotations

from pathlib import Path

import torch

from bnlab.distributed import World, gather_objects
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


def rng_entries(world: World, device: torch.device) -> dict:
    """A checkpoint's RNG entries: ``rng``, the streams of rank 0 (of the run, when alone), and
    in a data-parallel run ``rng_by_rank``, every rank's (a collective: every rank calls it)."""
    states = gather_objects(world, rng_state(device))
    return {"rng": states[0], **({"rng_by_rank": states} if world.size > 1 else {})}


def restore_rng(ckpt: dict, path: Path, world: World, device: torch.device) -> None:
    """Put this rank's streams of ``ckpt`` (read from ``path``) back; a checkpoint of another
    number of processes is refused (its ranks' streams and shards would not be this run's)."""
    states = ckpt.get("rng_by_rank", [ckpt["rng"]])
    if len(states) != world.size:
        raise UsageError(f"cannot resume from {path}: it was written by a run of {len(states)} "
                         f"process(es) and this one has {world.size}; resume it with "
                         f"dist.nproc={len(states)}")
    set_rng_state(states[world.rank], device)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at ``path``, tensors on ``device``; only plain data is unpickled
    (``weights_only``: a checkpoint that would run code is refused)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so, don't crash
        raise UsageError(f"cannot resume from {path}: {e.__class__.__name__}: {e}; "
                         "pass overwrite=true to start over") from None
