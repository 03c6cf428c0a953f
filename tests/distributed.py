"""Running checks in a gloo process group of spawned CPU processes, for the distributed tests.

Starting processes costs seconds (each imports torch), so a test module spawns once and runs
all its cases in that one group: :func:`run_checks` calls every named check on every rank, in
the same order, and returns each rank's outcome per check (None, or the failure's traceback),
so that each case is still its own pytest test. A check that raises on one rank while another
waits in a collective makes that one fail by the group's timeout instead of hanging.
"""

from __future__ import annotations

import datetime
import pickle
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)  # of every collective: a mismatch fails, not hangs


def _worker(rank: int, world_size: int, folder: str, module: str, names: list[str]) -> None:
    import importlib

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=world_size, timeout=TIMEOUT)
    checks = importlib.import_module(module).CHECKS
    outcomes: dict[str, str | None] = {}
    try:
        for name in names:
            try:
                checks[name](rank, world_size)
                outcomes[name] = None
            except Exception:
                outcomes[name] = traceback.format_exc()
    finally:
        (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(outcomes))
        dist.destroy_process_group()


def run_checks(module: str, names: list[str], folder: Path, world_size: int = 2
               ) -> list[dict[str, Any]]:
    """Run ``module.CHECKS[name](rank, world_size)`` for each of ``names`` on every rank of a new
    gloo group of ``world_size`` spawned processes; returns each rank's ``{name: None |
    traceback}``."""
    folder.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, str(folder), module, names),
                       nprocs=world_size, join=True, start_method="spawn")
    return [pickle.loads((folder / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]


def failures(outcomes: list[dict[str, Any]], name: str) -> str:
    """The tracebacks of check ``name`` on the ranks where it failed ('' if it passed)."""
    missing = [r for r, o in enumerate(outcomes) if name not in o]
    if missing:
        return f"check {name} did not run on ranks {missing}"
    return "\n".join(f"rank {r}:\n{o[name]}" for r, o in enumerate(outcomes) if o[name])
