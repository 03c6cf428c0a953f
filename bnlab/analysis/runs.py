"""Finding run dirs under the paths a user gives, and reading what `bnlab train` or `bnlab
signal` left in them.

A run dir holds `.hydra/` (config, overrides, hydra settings) and `metrics.json` (a training
run, kind `train`) or `signal.json` (a signal measurement, kind `signal`); a sweep dir holds one
run dir per job. Reading never fails on a half-written or broken run: such a run comes back
with a status that says so, because a comparison must list it, not crash on it.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bnlab.errors import UsageError

METRICS_FILE = "metrics.json"
SIGNAL_FILE = "signal.json"  # bnlab.rundir.SIGNAL
HYDRA_DIR = ".hydra"
EVENT_GLOB = "events.out.tfevents.*"

# Statuses whose numbers are final and enter a comparison; every other run is listed apart.
FINISHED = ("completed", "diverged")
# A "running" run that has written nothing for this long is most likely dead. Event files are
# flushed every minute or two and metrics.json once an epoch, so half an hour of silence is
# far beyond a slow CPU epoch.
STALE_AFTER_S = 30 * 60
# Overrides that say how a run executes, not what it is; used when hydra.yaml lacks the list.
RUN_MECHANICS_KEYS = frozenset({"seed"})


@dataclass(frozen=True)
class Run:
    """One run dir as read from disk; `metrics` is None when metrics.json (signal.json, for a
    signal run) is missing or bad."""

    path: Path
    status: str
    problem: str | None = None
    metrics: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    composed: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)
    mechanics_keys: frozenset[str] = RUN_MECHANICS_KEYS
    kind: str = "train"  # or "signal"

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def config(self) -> dict[str, Any]:
        """The run's summary config from metrics.json (norm, lr, seed, ...), or {}."""
        config = (self.metrics or {}).get("config")
        return config if isinstance(config, dict) else {}

    @property
    def diverged(self) -> bool:
        return self.status == "diverged" or bool((self.metrics or {}).get("diverged"))

    def metric(self, key: str) -> Any:
        return (self.metrics or {}).get(key)

    def lookup(self, key: str) -> Any:
        """The value of a dotted config key: the override if given, else the composed config,
        else Hydra's choice for a config group (`optim` -> `sgd`)."""
        if key in self.overrides:
            return self.overrides[key]
        value = _dotted_get(self.composed, key)
        if value is not None and not isinstance(value, dict):
            return value if not isinstance(value, list) else str(value)
        return self.choices.get(key)

    def describe(self) -> str:
        """A short label of what the run is, for rows and titles ("" when nothing says)."""
        keys = ("norm", "model", "depth", "lr", "dropout", "seed")
        if self.config:
            return " ".join(f"{k}={self.config[k]}" for k in keys if k in self.config)
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Every run dir under each path (a run dir itself, a sweep dir or a parent of sweeps).

    Raises UsageError for a path that does not exist, is not a directory, or holds no run.
    """
    found: dict[Path, None] = {}
    for path in paths:
        if not path.exists():
            raise UsageError(f"no such directory: {path}")
        if not path.is_dir():
            raise UsageError(f"not a directory: {path} (expected a run dir or a sweep dir)")
        runs = runs_under(path)
        if not runs:
            raise UsageError(
                f"not a run or sweep dir: {path} (no {HYDRA_DIR}/config.yaml or "
                f"{METRICS_FILE} found under it)"
            )
        found.update(dict.fromkeys(run.resolve() for run in runs))
    return list(found)


def runs_under(path: Path) -> list[Path]:
    """The run dirs at or below `path`, in natural order (`seed=2` before `seed=10`)."""
    return sorted(_walk_run_dirs(path), key=_natural_key)


def is_run_dir(path: Path) -> bool:
    return ((path / HYDRA_DIR / "config.yaml").is_file() or (path / METRICS_FILE).is_file()
            or (path / SIGNAL_FILE).is_file())


def event_files(run_dir: Path) -> list[Path]:
    """The run's event files, oldest first (a resumed run adds a newer file): writers start
    the name with the unix time."""
    return sorted(run_dir.glob(EVENT_GLOB))


def load_run(path: Path, now: float | None = None) -> Run:
    """Read one run dir; problems become the run's status, never an exception."""
    hydra = _read_hydra(path)
    if _is_signal_run(path, hydra.pop("job_name")):
        return _load_signal_run(path, hydra)
    metrics, problem = _read_metrics(path, METRICS_FILE,
                                     "crashed before its first epoch, or never started")
    if metrics is None:
        return Run(path, "broken", problem, None, **hydra)
    status = str(metrics.get("status", "")) or "unknown"
    if status == "running":
        idle_s = (time.time() if now is None else now) - _last_activity(path)
        if idle_s > STALE_AFTER_S:
            status, problem = "stale", f"status 'running' but no progress for {_ago(idle_s)}"
        else:
            problem = f"in progress, epoch {metrics.get('epochs_completed') or 0} done"
    elif status == "diverged" or (status == "completed" and metrics.get("diverged")):
        status = "diverged"
    elif status not in FINISHED:
        problem = _unfinished_reason(status, metrics)
    return Run(path, status, problem, metrics, **hydra)


def _is_signal_run(path: Path, job_name: str | None) -> bool:
    if (path / METRICS_FILE).is_file():
        return False
    return job_name == "signal" or (path / SIGNAL_FILE).is_file()


def _load_signal_run(path: Path, hydra: dict[str, Any]) -> Run:
    """A `bnlab signal` run: signal.json is written once, when the measurement is done."""
    document, problem = _read_metrics(path, SIGNAL_FILE, "the measurement did not finish")
    if document is None:
        return Run(path, "broken", problem, None, kind="signal", **hydra)
    status = str(document.get("status", "")) or "unknown"
    problem = None if status in FINISHED else f"unknown status {status!r}"
    return Run(path, status, problem, document, kind="signal", **hydra)


def _walk_run_dirs(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            dirnames.clear()  # a run dir holds no other runs; skip its checkpoints and logs
            yield here
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]


def _read_metrics(path: Path, name: str, why_missing: str
                  ) -> tuple[dict[str, Any] | None, str | None]:
    file = path / name
    if not file.is_file():
        return None, f"no {name} ({why_missing})"
    try:
        metrics = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"unreadable {name}: {err}"
    if not isinstance(metrics, dict):
        return None, f"unreadable {name}: expected a JSON object"
    return metrics, None


def _read_hydra(path: Path) -> dict[str, Any]:
    """Overrides, composed config, group choices and the job's name (`train`, `signal`) from
    `.hydra/`; {} (None) for what is missing."""
    hydra_dir = path / HYDRA_DIR
    overrides = _read_yaml(hydra_dir / "overrides.yaml")
    composed = _read_yaml(hydra_dir / "config.yaml")
    hydra = (_read_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra")
    hydra = hydra if isinstance(hydra, dict) else {}
    choices = _dotted_get(hydra, "runtime.choices")
    excluded = _dotted_get(hydra, "job.config.override_dirname.exclude_keys")
    job_name = _dotted_get(hydra, "job.name")
    return {
        "job_name": job_name if isinstance(job_name, str) else None,
        "overrides": _parse_overrides(overrides if isinstance(overrides, list) else []),
        "composed": composed if isinstance(composed, dict) else {},
        "choices": choices if isinstance(choices, dict) else {},
        "mechanics_keys": RUN_MECHANICS_KEYS | frozenset(map(str, excluded or ())),
    }


def _read_yaml(file: Path) -> Any:
    try:
        return yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _parse_overrides(lines: list[Any]) -> dict[str, Any]:
    """`optim.lr=0.1` -> {"optim.lr": 0.1}; the `+`/`++`/`~` prefixes say how, not what."""
    parsed = {}
    for line in map(str, lines):
        key, sep, value = line.partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra."):
            parsed[key] = parse_value(value)
    return parsed


def parse_value(text: str) -> Any:
    """An override value as Hydra would type it (yaml 1.1 would leave `1e-3` a string)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def _dotted_get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _last_activity(path: Path) -> float:
    files = [path / METRICS_FILE, path / "train.log", *path.glob(EVENT_GLOB)]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def _unfinished_reason(status: str, metrics: dict[str, Any]) -> str:
    epochs = metrics.get("epochs_completed")
    done = f"{epochs} epochs done" if epochs is not None else "no epoch done"
    if status in ("interrupted", "failed"):
        return f"{status} ({done})"
    return f"unknown status {status!r} ({done})"


def _ago(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _natural_key(path: Path) -> list[Any]:
    """Sort `lr=0.1,seed=10` after `lr=0.1,seed=2`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]
