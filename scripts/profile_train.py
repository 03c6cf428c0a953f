"""Where a ``bnlab train`` step spends its time: torch.profiler over real training steps.

The ``bnlab.train.Trainer`` is built from the config ``bnlab train`` composes (``model=cnn
norm=custom probe=off`` on the CIFAR-10 subset unless overridden), then ``--warmup`` steps run
unprofiled and ``--steps`` steps run under ``torch.profiler`` exactly as ``Trainer.fit`` runs
them (batch cutting and augmentation, ``train_step``, ``sync`` every ``log_every`` steps). Each
phase is wrapped in a ``record_function`` region here (``data``, ``step``, ``sync``), so the
table shows what share of a step each takes, then the ops with the most self CPU time.

For the Python side (interpreter overhead, logging, Hydra), sample a whole run with py-spy::

    py-spy record -o profile.svg -- bnlab train data.root=../shared/data/cifar10-subset \
        probe=off epochs=1

Usage::

    python scripts/profile_train.py                        # 60 steps, probe=off
    python scripts/profile_train.py probe=default          # any bnlab train overrides
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DEFAULT_ROOT, compose, restore_torch_globals

from bnlab import data as datasets
from bnlab import train
from bnlab.runtime import setup_process
from bnlab.tracking import Tracker

REGIONS = ("data", "step", "sync")


def profiled_steps(cfg, run_dir: Path, warmup: int, steps: int) -> profile:
    trainer = train.Trainer(cfg, run_dir)
    if warmup + steps > trainer.per_epoch:
        raise SystemExit(f"--warmup + --steps = {warmup + steps} must fit in one epoch "
                         f"({trainer.per_epoch} steps)")
    tracker = Tracker(run_dir)
    batches = iter(datasets.train_batches(trainer.data, cfg.batch_size, cfg.seed, 0, 0, 0,
                                          cfg.data.augment))
    if trainer.probes:
        trainer.record(tracker, trainer.probes.start(), 0)

    def one_step() -> None:
        with record_function("data"):
            x, y = next(batches)
        with record_function("step"):
            trainer.train_step(x, y, tracker)
        if trainer.state.step % cfg.log_every == 0:
            with record_function("sync"):
                trainer.sync(tracker)

    for _ in range(warmup):
        one_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one_step()
    tracker.close()
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("overrides", nargs="*", help="bnlab train overrides, e.g. probe=default")
    args = parser.parse_args()
    cfg = compose([f"data.root={DEFAULT_ROOT}", "model=cnn", "norm=custom", "probe=off",
                   "epochs=1", "progress=false", *args.overrides])
    with restore_torch_globals(), tempfile.TemporaryDirectory() as run_dir:
        setup_process(cfg)  # as bnlab train does
        prof = profiled_steps(cfg, Path(run_dir), args.warmup, args.steps)
    events = prof.key_averages()
    regions = {e.key: e.cpu_time_total for e in events if e.key in REGIONS}
    total = sum(regions.values())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps, "
          f"overrides: {' '.join(args.overrides) or '(none)'}")
    print(f"\nmean wall time per step: {total / args.steps / 1e3:.1f} ms")
    print("| region | ms per step | share |\n|---|---|---|")
    for name in REGIONS:
        t = regions.get(name, 0.0)
        print(f"| {name} | {t / args.steps / 1e3:.2f} | {t / total:.1%} |")
    print(f"\nops by self CPU time (top {args.rows}):")
    ops = sorted((e for e in events if e.key not in REGIONS),
                 key=lambda e: e.self_cpu_time_total, reverse=True)
    print("| op | calls per step | self ms per step | share of step |\n|---|---|---|---|")
    for e in itertools.islice(ops, args.rows):
        self_ms = e.self_cpu_time_total / args.steps / 1e3
        print(f"| `{e.key}` | {e.count / args.steps:g} | {self_ms:.2f} | "
              f"{e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
