"""``run(cfg)``: one training run, top to bottom.

setup → (resume) → for each epoch: batches → forward/backward → probes → optimizer step →
every ``log_every`` steps one host sync (loss log, divergence check, progress) → evaluation,
``metrics.json`` and checkpoint at the epoch's end.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import math
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils import deterministic

from bnlab import data as datasets
from bnlab.config import pick_device, validate
from bnlab.errors import UsageError
from bnlab.models import build_model, find_slots, norm_factory
from bnlab.tracking import Tracker, write_json

if TYPE_CHECKING:
    from bnlab.probes import Measurements, Probes

log = logging.getLogger(__name__)

FINISHED = ("completed", "diverged")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
LOCK = ".bnlab.lock"  # held (flock) while a process trains in the run dir
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# -- run dir bookkeeping -----------------------------------------------------------------------


def read_metrics(run_dir: Path) -> dict | None:
    path = run_dir / METRICS
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> dict | None:
    """Refuse to start over a run dir that holds a run, unless told to resume or overwrite.
    Returns the finished run's metrics when ``resume`` should just skip it."""
    metrics = read_metrics(run_dir)
    if metrics is None or overwrite:
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


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the whole run: two processes in one run dir (a
    sweep launched again while the first still runs) would interleave checkpoints, metrics and
    event files. The OS drops the lock when the process ends, however it ends."""
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


def clear_run_outputs(run_dir: Path) -> None:
    """``overwrite=true``: remove the old run's outputs (not Hydra's fresh .hydra/ files)."""
    for path in [*run_dir.glob("events.out.tfevents.*"), run_dir / CHECKPOINT, run_dir / METRICS]:
        path.unlink(missing_ok=True)


# -- building blocks ---------------------------------------------------------------------------


def make_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, cfg.beta2),
                            weight_decay=cfg.weight_decay)


def lr_factor(cfg: DictConfig, step: int, total: int, per_epoch: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) out of ``total``.
    A pure function of the step, so a resumed run needs no scheduler state."""
    warmup = round(cfg.warmup_epochs * per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "step":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


def model_kwargs(cfg: DictConfig) -> dict:
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(kwargs, dict)
    return {k: v for k, v in kwargs.items() if k not in ("name", "init")}


def build(cfg: DictConfig, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    norm = norm_factory(cfg.norm.name, eps=cfg.norm.eps, momentum=cfg.norm.momentum,
                        noise=cfg.norm.get("noise"))
    model = build_model(cfg.model.name, norm, init=cfg.model.init, **model_kwargs(cfg.model))
    return model.to(device=device, memory_format=fmt)


def compile_model(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of ``model`` (``compile=true``). On CPU, random numbers come from ATen's
    generators (Inductor's ``fallback_random``): Inductor's own CPU random kernels made a
    compiled noisy-BN cnn step 2x slower than eager, ATen's make it faster, and compiled runs
    then draw exactly the noise and dropout masks of eager ones (docs/benchmarks.md)."""
    return torch.compile(model, options={"fallback_random": True} if device.type == "cpu" else None)


def memory_format(cfg: DictConfig, device: torch.device) -> torch.memory_format:
    """The layout of conv weights and batches. ``auto`` is NHWC on CPU, where every model trained
    faster with it (CPU max-pooling in NCHW alone took 16% of a cnn step; docs/benchmarks.md),
    and on CUDA with ``amp`` (tensor-core convs want NHWC); NCHW elsewhere."""
    nhwc = cfg.channels_last
    if nhwc == "auto":
        nhwc = device.type == "cpu" or (device.type == "cuda" and cfg.amp)
    return torch.channels_last if nhwc else torch.contiguous_format


def setup_torch(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # cuBLAS is deterministic only with this (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (a guard against reads of
    # uninitialized memory): ~25M extra element writes, ~10% of a CPU step of model=cnn, and
    # no op here reads such memory (weights are bit-identical with and without the fill).
    deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.manual_seed(cfg.seed)
    keep_freed_memory()


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
              "GLIBC_TUNABLES")


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse the memory of freed activations instead of handing it back to
    the OS and faulting it in again at the next step. By default a block at or above the
    (dynamic) mmap threshold gets fresh pages and the heap top is trimmed past the trim
    threshold; with a CPU step's multi-megabyte tensors that is ~10k page faults per step, 12%
    of a ``model=cnn`` step here, for no gain in peak RSS. The threshold cannot go above
    32 MiB, and a (128, 64, 32, 32) float32 activation (VGG's first stage) is just above it,
    so mmap is switched off for blocks the heap can hold (each such block was 8k page faults;
    glibc still mmaps what a thread's arena cannot hold). Setting any of
    ``MALLOC_ENV`` leaves malloc as the user configured it;
    ``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` (a default value) keeps glibc's default
    behaviour."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_ENV):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc-like
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)  # large blocks come from the heap too (the mmap threshold is moot)
    mallopt(m_trim_threshold, 512 << 20)


def summary_config(cfg: DictConfig) -> dict:
    """The resolved values a comparison needs, flat, under stable names."""
    return {
        "norm": cfg.norm.name, "model": cfg.model.name, "lr": cfg.optim.lr,
        "dropout": cfg.model.get("dropout", 0.0), "batch_size": cfg.batch_size, "seed": cfg.seed,
        "epochs": cfg.epochs, "optimizer": cfg.optim.name, "momentum": cfg.optim.momentum,
        "weight_decay": cfg.optim.weight_decay, "sched": cfg.sched.name, "data": cfg.data.name,
    }


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next safe point (the list
    receives the signal number); a second one interrupts at once."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # signals go to main only
        yield received
        return
    old = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a kill at any moment leaves the previous checkpoint intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ``ru_maxrss`` also counts the
    parent's resident memory at fork (a launcher's, a benchmark's) when that was larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


# -- the loop ----------------------------------------------------------------------------------


@dataclass
class RunState:
    """Everything about where the run stands; saved in checkpoints."""

    epoch: int = 0           # epochs completed
    batch: int = 0           # batches done in the current epoch
    step: int = 0            # optimizer steps done
    first_loss: float | None = None
    diverged_step: int | None = None
    best_test_acc: float | None = None
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    epoch_loss: float = 0.0  # sums over the current epoch, for its mean loss and accuracy
    epoch_correct: int = 0
    epoch_seen: int = 0
    history: list = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.device = pick_device(cfg.device)
        setup_torch(cfg)
        self.data = datasets.load(cfg.data, self.device, cfg.seed)
        self.per_epoch = datasets.steps_per_epoch(self.data, cfg.batch_size)
        if self.per_epoch == 0:
            raise UsageError(f"batch_size={cfg.batch_size} is larger than the training set "
                             f"({len(self.data.train)} images)")
        self.total_steps = cfg.epochs * self.per_epoch
        # Weights and batches in one layout, so a channels_last conv does not convert them.
        self.memory_format = memory_format(cfg, self.device)
        self.model = build(cfg, self.device, self.memory_format)
        self.forward = compile_model(self.model, self.device) if cfg.compile else self.model
        self.optimizer = make_optimizer(cfg.optim, self.model)
        self.probes = self._make_probes()
        self.state = RunState()
        self.losses: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # since the last sync

    def _make_probes(self) -> Probes | None:
        if not self.cfg.probe.enabled:
            return None
        from bnlab.probes import Probes  # probe code is loaded only when probing

        batch = datasets.probe_batch(self.data, self.cfg.probe.batch_size)
        return Probes(self.cfg.probe, self.model, self.optimizer, F.cross_entropy, batch,
                      find_slots(self.model))

    # -- checkpoints

    def checkpoint(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(self.device), "progress": asdict(self.state),
                "probes": self.probes.state_dict() if self.probes else None}

    def restore(self, path: Path) -> None:
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # a truncated or foreign file: say so, don't crash
            raise UsageError(f"cannot resume from {path}: {e.__class__.__name__}: {e}; "
                             "pass overwrite=true to start over") from None
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], self.device)
        self.state = RunState(**ckpt["progress"])
        if self.probes and ckpt["probes"] is not None:
            self.probes.load_state_dict(ckpt["probes"])

    # -- steps

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_factor(self.cfg.sched, self.state.step, self.total_steps,
                                           self.per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, x: torch.Tensor, y: torch.Tensor, tracker: Tracker) -> None:
        step = self.state.step + 1
        lr = self.set_lr()
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.amp):
            out = self.forward(x)
            loss = F.cross_entropy(out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.probes:
            self.record(tracker, self.probes.after_backward(step, x, y), step)
        self.optimizer.step()
        self.state.step = step
        if self.probes:
            self.record(tracker, self.probes.after_step(step), step)
        correct = (out.argmax(1) == y).sum()
        self.losses.append((step, loss.detach(), correct))
        tracker.scalars({"opt/lr": lr}, step)

    @staticmethod
    def record(tracker: Tracker, m: Measurements, step: int) -> None:
        if m.scalars:
            tracker.scalars(m.scalars, step)
        if m.histograms:
            tracker.histograms(m.histograms, step)

    def sync(self, tracker: Tracker) -> tuple[float, float]:
        """The one host sync per ``log_every`` steps: per-step losses to TensorBoard, epoch sums,
        and the divergence check (which names the exact first bad step)."""
        if not self.losses:
            return math.nan, math.nan
        values = torch.stack([torch.stack([loss, c.float()]) for _, loss, c in self.losses])
        n = self.cfg.batch_size
        for (step, _, _), (loss, correct) in zip(self.losses, values.tolist(), strict=True):
            tracker.scalars({"train/loss": loss, "train/acc": correct / n}, step)
            if self.state.first_loss is None:
                self.state.first_loss = loss
            bad = not math.isfinite(loss) or loss > self.cfg.diverge_factor * self.state.first_loss
            if bad and self.state.diverged_step is None:
                self.state.diverged_step = step
            self.state.epoch_loss += loss
            self.state.epoch_correct += int(correct)
            self.state.epoch_seen += n
        self.losses.clear()
        tracker.flush()
        loss, acc = values.mean(0).tolist()
        return loss, acc / n

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        self.model.eval()
        loss, correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        split = self.data.test
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.amp):
            for x, y in datasets.eval_batches(self.data, split, self.cfg.eval_batch_size):
                out = self.forward(x.contiguous(memory_format=self.memory_format)).float()
                loss += F.cross_entropy(out, y, reduction="sum")
                correct += (out.argmax(1) == y).sum()
        self.model.train()
        return loss.item() / len(split), correct.item() / len(split)

    # -- outputs

    def metrics(self, status: str) -> dict:
        s, hist = self.state, self.state.history
        last = hist[-1] if hist else {}
        diverged = s.diverged_step is not None
        seen = s.step * self.cfg.batch_size
        return {
            "status": status,
            "final_test_acc": None if diverged else last.get("test_acc"),
            "best_test_acc": s.best_test_acc,
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "diverged": diverged, "diverged_step": s.diverged_step,
            "epochs_completed": s.epoch, "steps": s.step,
            "wall_time_s": round(s.wall_time_s, 3),
            "images_per_s": round(seen / s.train_time_s, 1) if s.train_time_s else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": summary_config(self.cfg),
            "history": hist,
        }

    def end_epoch(self, tracker: Tracker) -> None:
        s = self.state
        test_loss, test_acc = self.evaluate()
        s.epoch += 1
        s.batch = 0
        s.best_test_acc = max(test_acc, s.best_test_acc or 0.0)
        entry = {"epoch": s.epoch, "step": s.step,
                 "train_loss": s.epoch_loss / max(1, s.epoch_seen / self.cfg.batch_size),
                 "train_acc": s.epoch_correct / max(1, s.epoch_seen),
                 "test_loss": test_loss, "test_acc": test_acc}
        s.history.append(entry)
        s.epoch_loss, s.epoch_correct, s.epoch_seen = 0.0, 0, 0
        tracker.scalars({"test/loss": test_loss, "test/acc": test_acc}, s.step)
        tracker.flush()
        log.info("epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f", s.epoch,
                 self.cfg.epochs, entry["train_loss"], entry["train_acc"], test_loss, test_acc)

    # -- the run

    def fit(self, tracker: Tracker, stop: list[int], bar: Progress | None) -> str:
        """Train until done, diverged or asked to stop; returns the status."""
        s, cfg = self.state, self.cfg
        if self.probes and s.step == 0:
            self.record(tracker, self.probes.start(), 0)
        task = bar.add_task("train", total=self.total_steps, completed=s.step, loss=math.nan,
                            acc=math.nan, ips=0.0) if bar else None
        while s.epoch < cfg.epochs:
            t0, first_batch = time.perf_counter(), s.batch
            batches = datasets.train_batches(self.data, cfg.batch_size, cfg.seed, s.epoch,
                                             s.batch, s.step, cfg.data.augment)
            for x, y in batches:
                self.train_step(x, y, tracker)
                s.batch += 1
                if s.step % cfg.log_every == 0 or s.batch == self.per_epoch or stop:
                    loss, acc = self.sync(tracker)
                    if bar is not None:
                        ips = (s.batch - first_batch) * cfg.batch_size / (time.perf_counter() - t0)
                        bar.update(task, completed=s.step, loss=loss, acc=acc, ips=ips)
                if s.diverged_step is not None or stop:
                    break
            dt = time.perf_counter() - t0
            s.train_time_s += dt
            s.wall_time_s += dt
            if s.diverged_step is not None:
                log.warning("diverged at step %d", s.diverged_step)
                return "diverged"
            if stop:
                return "interrupted"
            t0 = time.perf_counter()
            self.end_epoch(tracker)
            s.wall_time_s += time.perf_counter() - t0
            if s.epoch < cfg.epochs:
                self.save(tracker, "running")
        return "completed"

    def save(self, tracker: Tracker, status: str) -> dict:
        tracker.flush()
        save_checkpoint(self.run_dir / CHECKPOINT, self.checkpoint())
        metrics = self.metrics(status)
        write_json(self.run_dir / METRICS, metrics)
        return metrics


def progress_bar(cfg: DictConfig) -> Progress | None:
    show = cfg.progress
    if show == "auto":
        show = sys.stderr.isatty() and not os.environ.get("CI")
    if not show:
        return None
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]:.3f}"
                               "  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"),
                    TimeRemainingColumn(),
                    transient=True)


def hparams(trainer: Trainer, tracker: Tracker, metrics: dict) -> None:
    params = {k: ("null" if v is None else v) for k, v in summary_config(trainer.cfg).items()}
    values = {"hparam/final_test_acc": metrics["final_test_acc"],
              "hparam/best_test_acc": metrics["best_test_acc"],
              "hparam/diverged": float(metrics["diverged"])}
    tracker.hparams(params, {k: float("nan") if v is None else v for k, v in values.items()},
                    trainer.state.step)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train one run in ``run_dir`` and return its metrics (also written to metrics.json)."""
    validate(cfg)
    with run_dir_lock(run_dir):
        return _run_locked(cfg, run_dir)


def _run_locked(cfg: DictConfig, run_dir: Path) -> dict:
    finished = check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    if finished is not None:
        log.info("%s already finished (status %s): skipping", run_dir, finished["status"])
        return finished
    if cfg.overwrite:
        clear_run_outputs(run_dir)
    trainer = Trainer(cfg, run_dir)
    ckpt = run_dir / CHECKPOINT
    if cfg.resume and ckpt.exists():
        trainer.restore(ckpt)
        log.info("resuming %s at step %d (epoch %d)", run_dir, trainer.state.step,
                 trainer.state.epoch)
    tracker = Tracker(run_dir, purge_step=trainer.state.step + 1 if trainer.state.step else None)
    if trainer.probes:
        tracker.layout([n for slot in find_slots(trainer.model) for n in (slot.layer, slot.norm)])
    bar = progress_bar(cfg)
    try:
        with stop_on_signals() as stop, bar or contextlib.nullcontext():
            write_json(run_dir / METRICS, trainer.metrics("running"))
            status = trainer.fit(tracker, stop, bar)
        metrics = trainer.save(tracker, status)
        if status != "interrupted":
            hparams(trainer, tracker, metrics)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, but an honest record
        write_json(run_dir / METRICS, trainer.metrics("interrupted"))
        raise SystemExit(EXIT_CODES[signal.SIGINT]) from None
    except BaseException:  # a bug: leave a readable record, keep the traceback
        write_json(run_dir / METRICS, trainer.metrics("failed"))
        raise
    finally:
        tracker.close()
    if stop:  # also when the signal came after the last step: a sweep must stop here too
        raise SystemExit(EXIT_CODES[signal.Signals(stop[0])])
    return metrics

