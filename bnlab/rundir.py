"""The run-dir format, the one place both its writer (``bnlab.train``) and its readers
(``bnlab compare``/``plot``) take it from: file names, statuses, the summary-config keys, the
lock that keeps two processes out of one run dir, and atomic writes.

A run dir holds ``.hydra/`` (config, overrides, Hydra settings), ``metrics.json``, TensorBoard
event files, ``checkpoint.pt`` and ``train.log``; with ``keep_epoch_checkpoints`` also
``checkpoints/epoch_NNN.pt``, and ``bnlab curvature`` adds ``curvature.json`` and its figure;
a ``bnlab signal`` run dir holds ``.hydra/``, ``signal.json``, its figures and ``signal.log``;
a sweep dir holds one run dir per job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from bnlab.errors import UsageError

log = logging.getLogger(__name__)

METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"  # the latest one, which resume continues from
EPOCH_CHECKPOINTS = "checkpoints"  # keep_epoch_checkpoints: one per epoch end (0: initial weights)
CURVATURE = "curvature.json"  # bnlab curvature's measures
SIGNAL = "signal.json"  # what bnlab signal writes instead of metrics.json (bnlab.signal.report)
HYDRA_DIR = ".hydra"
EVENT_GLOB = "events.out.tfevents.*"
LOCK = ".bnlab.lock"  # held (flock) while a process works in the run dir

STATUSES = ("running", "completed", "diverged", "interrupted", "failed")
FINISHED = ("completed", "diverged")  # final numbers: a comparison uses them


def summary_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved values a comparison needs, flat, under stable names (``metrics.json``'s
    ``config``, TensorBoard's hparams columns), in the order a user compares them. The norm's
    placement: ``norm_slots`` (``all``, ``conv``, ``first``, or the slot paths joined by
    commas) and ``norm_rest`` (the option in the other slots; None when the norm is in all)."""
    return {
        "norm": cfg.norm.name, "lr": cfg.optim.lr, "dropout": cfg.model.get("dropout", 0.0),
        "batch_size": cfg.batch_size, "model": cfg.model.name, "seed": cfg.seed,
        "epochs": cfg.epochs, "optimizer": cfg.optim.name, "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay, "sched": cfg.sched.name, "data": cfg.data.name,
        **norm_placement(cfg),
    }


def norm_placement(cfg: DictConfig) -> dict[str, Any]:
    """``norm_slots`` and ``norm_rest`` of :func:`summary_config` (``bnlab signal``'s too)."""
    slots = cfg.norm.get("slots", "all")
    return {"norm_slots": slots if isinstance(slots, str) else ",".join(slots),
            "norm_rest": None if slots == "all" else cfg.norm.rest}


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` into a temporary file next to ``path``, then rename it over
    ``path``: a reader (or a crash at any moment) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open would not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: object) -> None:
    """``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def read_metrics(run_dir: Path) -> dict | None:
    """``metrics.json`` of ``run_dir``; None when it is missing or unreadable."""
    try:
        metrics = json.loads((run_dir / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to start over a run dir that holds a run, unless told to resume or overwrite.
    Returns the finished run's metrics when ``resume`` should just skip it. ``resume`` wins
    over ``overwrite``: resuming never deletes progress."""
    metrics = read_metrics(run_dir)
    if metrics is None or (overwrite and not resume):
        return None
    status = metrics.get("status")
    if status in FINISHED:
        if resume:
            return metrics
        raise UsageError(f"{run_dir} already holds a finished run (status {status}); pass "
                         "resume=true to keep it or overwrite=true to start over")
    if not resume:
        raise UsageError(f"{run_dir} holds an unfinished run (status {status}); pass "
                         "resume=true to continue it or overwrite=true to start over")
    return None


def check_train_dir(cfg: DictConfig, run_dir: Path) -> None:
    """``bnlab train``'s guard of its run dir (:func:`check_run_dir` with the run's flags)."""
    check_run_dir(run_dir, cfg.resume, cfg.overwrite)


def train_summary(run_dir: Path) -> list[str]:
    """The end of a training run, however it ended: status, accuracy, time, and where to look
    (nothing while the run is still running or never wrote metrics)."""
    m = read_metrics(run_dir)
    if m is None or m.get("status") == "running":
        return []
    status, acc, best = m["status"], m.get("final_test_acc"), m.get("best_test_acc")
    if m.get("diverged"):
        lr = m.get("lr_at_divergence")
        result = f"diverged at step {m['diverged_step']}" + (f" (lr {lr:.3g})" if lr else "")
    elif acc is not None:
        result = f"test acc {acc:.4f} (best {best:.4f})"
    else:
        result = f"{m.get('steps', 0)} steps"
    lines = [f"{status}: {result}, {m.get('wall_time_s', 0):.1f} s, run dir {run_dir}"]
    if status == "interrupted":
        lines.append(f"  continue: bnlab train resume={run_dir}")
    lines.append(f"  look at it: tensorboard --logdir {run_dir}   |   "
                 f"bnlab plot {run_dir} --out {run_dir / 'activations.png'}")
    return lines


def epoch_checkpoint(epoch: int) -> str:
    """The path, in a run dir, of the checkpoint kept at the end of ``epoch`` (``0``: before
    the first step)."""
    return f"{EPOCH_CHECKPOINTS}/epoch_{epoch:03d}.pt"


def kept_epochs(run_dir: Path) -> list[int]:
    """The epochs whose checkpoints ``run_dir`` kept, ascending."""
    names = (p.stem.removeprefix("epoch_") for p in (run_dir / EPOCH_CHECKPOINTS).glob(
        "epoch_*.pt"))
    return sorted(int(n) for n in names if n.isdigit())


def train_sweep_summary(sweep_dir: Path) -> list[str]:
    """The end of a ``bnlab train`` sweep: where it is and how to look at it."""
    return [f"sweep done: {sweep_dir}",
            f"  compare: bnlab compare {sweep_dir}   |   tensorboard --logdir {sweep_dir}"]


def clear_run_outputs(run_dir: Path) -> None:
    """``overwrite=true``: remove the old run's outputs (not Hydra's fresh .hydra/ files)."""
    kept = [run_dir / epoch_checkpoint(e) for e in kept_epochs(run_dir)]
    for path in [*run_dir.glob(EVENT_GLOB), run_dir / CHECKPOINT, run_dir / METRICS, *kept]:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir``: two processes in one run dir (a sweep launched
    again while the first still runs) would interleave checkpoints, metrics and event files.
    The OS drops it when the process ends, however it ends."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{run_dir} is in use by another bnlab process; wait for it to "
                             "finish or choose another run dir") from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            log.warning("cannot lock %s (%s): not guarded against a second process", run_dir,
                        e.strerror)
        yield


class HeldLock:
    """One run dir's lock held across calls: the CLI takes it in its checks, before Hydra writes
    ``.hydra/``, and releases it when the run ends (a single place: ``python -m bnlab.cli`` runs
    the CLI as ``__main__`` while Hydra imports its callback from ``bnlab.cli``)."""

    def __init__(self) -> None:
        self._stack, self._run_dir = contextlib.ExitStack(), None

    def take(self, run_dir: Path) -> None:
        self._stack.enter_context(run_dir_lock(run_dir))
        self._run_dir = run_dir.resolve()

    def holds(self, run_dir: Path) -> bool:
        return self._run_dir == run_dir.resolve()

    def release(self) -> None:
        self._stack.close()
        self._run_dir = None


HELD_LOCK = HeldLock()
