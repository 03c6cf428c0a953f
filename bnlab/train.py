"""``run(cfg)``: one training run, top to bottom.

setup → (resume) → for each epoch: batches → forward/backward → probes → optimizer step →
every ``log_every`` steps one host sync (loss log, divergence check, progress) → evaluation,
``metrics.json`` and checkpoint at the epoch's end.

The same loop runs in every process of a data-parallel job (``bnlab.distributed`` has its
rules): each trains on its shard of the batch, rank 0 alone probes and writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from bnlab import data as datasets
from bnlab import distributed, registry
from bnlab.checkpoint import load_checkpoint, restore_rng, rng_entries
from bnlab.config import validate
from bnlab.errors import UsageError
from bnlab.evaluation import evaluate, evaluate_precise_bn
from bnlab.models import find_slots
from bnlab.nn.syncbn import local_statistics
from bnlab.rundir import (
    CHECKPOINT,
    METRICS,
    check_run_dir,
    clear_run_outputs,
    epoch_checkpoint,
    run_dir_lock,
    summary_config,
    write_atomic,
    write_json,
)
from bnlab.runtime import EXIT_CODES, compile_model, memory_format, peak_rss_mb, stop_on_signals
from bnlab.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from bnlab.probes import Measurements, Probes

log = logging.getLogger(__name__)

# -- building blocks ---------------------------------------------------------------------------


def build(cfg: DictConfig, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    """The model of ``cfg.model`` with ``cfg.norm`` in its slots, on ``device``, layout ``fmt``."""
    model = registry.build("model", cfg.model).build(registry.build("norm", cfg.norm))
    return model.to(device=device, memory_format=fmt)


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
        self.world = distributed.start()
        self.device = distributed.device(cfg.device, self.world)
        torch.manual_seed(cfg.seed)
        self.data = datasets.load(cfg.data, self.device, cfg.seed)
        self.per_epoch = datasets.steps_per_epoch(self.data, cfg.batch_size)
        if self.per_epoch == 0:
            raise UsageError(f"batch_size={cfg.batch_size} is larger than the training set "
                             f"({len(self.data.train)} images)")
        self.total_steps = cfg.epochs * self.per_epoch
        # Weights and batches in one layout, so a channels_last conv does not convert them.
        self.memory_format = memory_format(cfg, self.device)
        self.model = build(cfg, self.device, self.memory_format)
        parallel = distributed.wrap(self.model, self.world, self.device)
        self.forward = compile_model(parallel, self.device) if cfg.compile else parallel
        self.optimizer = registry.build("optim", cfg.optim).build(self.model.parameters())
        self.schedule = registry.build("sched", cfg.sched)
        self.probes = self._make_probes()
        distributed.seed_rank(cfg.seed, self.world)  # (after the weights, which all ranks share)
        self.state = RunState()
        self.losses: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # since the last sync
        self.agreed_stop = 0  # the signal to stop for, as the last host sync agreed (0: none)

    def _make_probes(self) -> Probes | None:
        if not self.cfg.probe.enabled or not self.world.main:
            return None
        from bnlab.probes import Probes, warn_long_intervals

        warn_long_intervals(self.cfg.probe, self.total_steps)
        batch = datasets.probe_batch(self.data, self.cfg.probe.batch_size)
        return Probes(self.cfg.probe, self.model, self.optimizer, F.cross_entropy, batch,
                      find_slots(self.model))

    # -- checkpoints

    def checkpoint(self) -> dict:
        """The run's state (a collective in a data-parallel run: every rank calls it)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **rng_entries(self.world, self.device), "progress": asdict(self.state),
                "probes": self.probes.state_dict() if self.probes else None}

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, self.device)
        restore_rng(ckpt, path, self.world, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = RunState(**ckpt["progress"])
        if self.probes and ckpt["probes"] is not None:
            self.probes.load_state_dict(ckpt["probes"])

    # -- steps

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based)."""
        return self.schedule.lr(self.cfg.optim.lr, step - 1, self.total_steps, self.per_epoch)

    def set_lr(self) -> float:
        lr = self.lr_at(self.state.step + 1)
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
        if self.probes:  # (rank 0 only: no SyncBN layer may wait for the others there)
            with local_statistics():
                self.record(tracker, self.probes.after_backward(step, x, y), step)
        self.optimizer.step()
        distributed.average_buffers(self.world, self.model)
        self.state.step = step
        if self.probes:
            with local_statistics():
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

    def sync(self, tracker: Tracker, stop: list[int]) -> tuple[float, float]:
        """The one host sync per ``log_every`` steps: per-step losses to TensorBoard, epoch sums,
        and the divergence check (which names the exact first bad step). In a data-parallel
        run the losses are the global batch's and the ranks agree on a stop request."""
        if not self.losses:
            return math.nan, math.nan
        values = torch.stack([torch.stack([loss, c.float()]) for _, loss, c in self.losses])
        values, self.agreed_stop = distributed.gather_sync(self.world, values, stop)
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

    # -- outputs

    def metrics(self, status: str) -> dict:
        s, hist = self.state, self.state.history
        last = hist[-1] if hist else {}
        diverged = s.diverged_step is not None
        seen = s.step * self.cfg.batch_size
        return {
            "status": status,
            "final_test_acc": None if diverged else last.get("test_acc"),
            "final_test_acc_precise_bn": None if diverged else last.get("test_acc_precise_bn"),
            "best_test_acc": s.best_test_acc,
            "final_train_loss": last.get("train_loss"),
            "final_train_acc": last.get("train_acc"),
            "diverged": diverged, "diverged_step": s.diverged_step,
            "lr_at_divergence": self.lr_at(s.diverged_step) if diverged else None,
            "epochs_completed": s.epoch, "steps": s.step,
            "wall_time_s": round(s.wall_time_s, 3),
            "images_per_s": round(seen / s.train_time_s, 1) if s.train_time_s else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "config": summary_config(self.cfg),
            "history": hist,
        }

    def end_epoch(self, tracker: Tracker) -> None:
        s = self.state
        test_loss, test_acc = evaluate(self.model, self.forward, self.data, self.cfg,
                                       self.memory_format, self.world)
        s.epoch += 1
        s.batch = 0
        s.best_test_acc = max(test_acc, s.best_test_acc or 0.0)
        entry = {"epoch": s.epoch, "step": s.step,
                 "train_loss": s.epoch_loss / max(1, s.epoch_seen / self.cfg.batch_size),
                 "train_acc": s.epoch_correct / max(1, s.epoch_seen),
                 "test_loss": test_loss, "test_acc": test_acc}
        if self.cfg.eval.precise_bn_batches:
            entry["test_loss_precise_bn"], entry["test_acc_precise_bn"] = evaluate_precise_bn(
                self.model, self.data, self.cfg, self.memory_format, s.epoch, self.world)
            tracker.scalars({"test/loss_precise_bn": entry["test_loss_precise_bn"],
                             "test/acc_precise_bn": entry["test_acc_precise_bn"]}, s.step)
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
            with local_statistics():
                self.record(tracker, self.probes.start(), 0)
        if s.step == 0:
            self.keep_epoch()
        task = bar.add_task("train", total=self.total_steps, completed=s.step, loss=math.nan,
                            acc=math.nan, ips=0.0) if bar else None
        while s.epoch < cfg.epochs:
            t0, first_batch = time.perf_counter(), s.batch
            batches = datasets.train_batches(self.data, cfg.batch_size, cfg.seed, s.epoch,
                                             s.batch, s.step, cfg.data.augment,
                                             self.world.rank, self.world.size)
            for x, y in batches:
                self.train_step(x, y, tracker)
                s.batch += 1
                # A signal syncs at once when alone; several processes agree at the next sync.
                if (s.step % cfg.log_every == 0 or s.batch == self.per_epoch
                        or (stop and self.world.size == 1)):
                    loss, acc = self.sync(tracker, stop)
                    if bar is not None:
                        ips = (s.batch - first_batch) * cfg.batch_size / (time.perf_counter() - t0)
                        bar.update(task, completed=s.step, loss=loss, acc=acc, ips=ips)
                if s.diverged_step is not None or self.agreed_stop:
                    break
            dt = time.perf_counter() - t0
            s.train_time_s += dt
            s.wall_time_s += dt
            if s.diverged_step is not None:
                log.warning("diverged at step %d", s.diverged_step)
                return "diverged"
            if self.agreed_stop:
                return "interrupted"
            t0 = time.perf_counter()
            self.end_epoch(tracker)
            s.wall_time_s += time.perf_counter() - t0
            if s.epoch < cfg.epochs:
                self.save(tracker, "running")
        return "completed"

    def save(self, tracker: Tracker, status: str) -> dict:
        """Checkpoint and metrics.json, written by rank 0 (every rank calls it)."""
        tracker.flush()
        state = self.checkpoint()
        metrics = self.metrics(status)
        self.keep_epoch(state)
        if self.world.main:
            write_atomic(self.run_dir / CHECKPOINT, lambda f: torch.save(state, f))
            write_json(self.run_dir / METRICS, metrics)
        return metrics

    def keep_epoch(self, state: dict | None = None) -> None:
        """``keep_epoch_checkpoints``: at an epoch's end (or before the first step), a copy of
        the checkpoint (``state``, or the current one: every rank calls it) under that epoch's
        name, written by rank 0."""
        if self.cfg.keep_epoch_checkpoints and self.state.batch == 0:
            kept = state or self.checkpoint()
            if self.world.main:
                write_atomic(self.run_dir / epoch_checkpoint(self.state.epoch),
                             lambda f: torch.save(kept, f))

    def write_metrics(self, status: str) -> None:
        if self.world.main:
            write_json(self.run_dir / METRICS, self.metrics(status))


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
    values = {"hparam/final_test_acc": metrics["final_test_acc"],
              "hparam/best_test_acc": metrics["best_test_acc"],
              "hparam/diverged": float(metrics["diverged"])}
    tracker.hparams(summary_config(trainer.cfg),
                    {k: float("nan") if v is None else v for k, v in values.items()},
                    trainer.state.step)


def run(cfg: DictConfig, run_dir: Path, locked: bool = False) -> dict:
    """Train one run in ``run_dir`` and return its metrics (also written to metrics.json).
    The run holds the run dir's lock to its end; ``locked``: the caller already holds it (the
    CLI takes it before Hydra writes ``.hydra/``). In a data-parallel run rank 0 holds it, and
    its word on ``locked`` counts."""
    validate(cfg)
    world = distributed.start()
    with contextlib.ExitStack() as lock:
        if not distributed.broadcast(world, locked):
            distributed.from_main(world, lambda: lock.enter_context(run_dir_lock(run_dir)))
        return _run_locked(cfg, run_dir, world)


def _run_locked(cfg: DictConfig, run_dir: Path, world: distributed.World) -> dict:
    finished = distributed.from_main(
        world, lambda: check_run_dir(run_dir, cfg.resume, cfg.overwrite))
    if finished is not None:
        log.info("%s already finished (status %s): skipping", run_dir, finished["status"])
        return finished
    if cfg.overwrite and not cfg.resume and world.main:
        clear_run_outputs(run_dir)
    trainer = Trainer(cfg, run_dir)
    ckpt = run_dir / CHECKPOINT
    if cfg.resume and ckpt.exists():
        trainer.restore(ckpt)
        log.info("resuming %s at step %d (epoch %d)", run_dir, trainer.state.step,
                 trainer.state.epoch)
    purge = trainer.state.step + 1 if trainer.state.step else None
    tracker = Tracker(run_dir, purge_step=purge) if world.main else NullTracker()
    if trainer.probes:
        tracker.layout([n for slot in find_slots(trainer.model) for n in (slot.layer, slot.norm)])
    bar = progress_bar(cfg) if world.main else None
    try:
        with stop_on_signals() as stop, bar or contextlib.nullcontext():
            trainer.write_metrics("running")
            status = trainer.fit(tracker, stop, bar)
        metrics = trainer.save(tracker, status)
        if status != "interrupted":
            hparams(trainer, tracker, metrics)
        # a signal after the last host sync too: every rank exits alike
        _, signum = distributed.gather_sync(world, torch.zeros(0, 2), stop)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint, but an honest record
        trainer.write_metrics("interrupted")
        raise SystemExit(EXIT_CODES[signal.SIGINT]) from None
    except BaseException:  # a bug: leave a readable record, keep the traceback
        trainer.write_metrics("failed")
        raise
    finally:
        tracker.close()
    if signum:  # also when the signal came after the last step: a sweep must stop here too
        raise SystemExit(EXIT_CODES[signal.Signals(signum)])
    return metrics

