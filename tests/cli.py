"""Running ``bnlab`` as a user would, in a subprocess, for the end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def tiny(root: Path, *extra: str) -> list[str]:
    """Overrides for a run of a few seconds on the tests' tiny CIFAR-10."""
    return [f"data.root={root}", "model.channels=[4,8]", "model.hidden=16", "batch_size=10",
            "eval_batch_size=64", "epochs=2", "threads=1", *extra]


def bnlab(*args: str, cwd: Path, env: dict | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnlab.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its path and content hash: equal before and after a
    refused command means nothing already written was touched."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
