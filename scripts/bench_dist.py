"""Benchmark data-parallel training on CPU: SyncBatchNorm against per-device BN, and DDP against
one process. Two processes in a gloo group (spawned here, a file rendezvous), one torch thread
each (``--threads``), glibc malloc set up as ``bnlab train`` sets it.

Section ``layer``: one training-mode step (forward, then ``autograd.grad`` of input, weight and
bias) of ``bnlab.nn.SyncBatchNorm`` on each rank's shard, against ``bnlab.nn.BatchNorm2d`` (the
per-device BN: fast path, and the reference code SyncBN is built from), at per-rank shapes of
``SHAPES``; and the two bare ``all_reduce`` calls SyncBN makes (2C+1 float64 numbers forward,
2C float32 backward), which are its overhead over per-device BN's reference.

Section ``cnn``: one SGD step of ``model=cnn`` (config defaults, channels_last) on a global
batch of 128: one process alone (rank 0 while rank 1 waits), against both processes under DDP
with 64 each, per-device BN (``norm=custom``, buffers averaged each step as ``bnlab train``
does) and ``norm=sync``. Throughput is images/s; 2x one process is the ideal.

Rounds interleave every variant (so a shared machine's drifts hit all alike); medians over
``--rounds`` after warm-up, as markdown tables (record them in docs/benchmarks.md).

Usage::

    python scripts/bench_dist.py                  # both sections, 21 rounds
    python scripts/bench_dist.py --quick          # 5 rounds
    python scripts/bench_dist.py --section layer
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnlab import distributed
from bnlab.distributed import World
from bnlab.nn import BatchNorm2d, SyncBatchNorm
from bnlab.runtime import keep_freed_memory

SHAPES = [(64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8), (32, 256, 4, 4)]
Step = Callable[[], None]


def timed(steps: dict[str, Step], rounds: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each step, one call of each per round, on every rank in
    the same order (a barrier before each call, so collectives line up)."""
    for step in steps.values():
        for _ in range(warmup):
            dist.barrier()
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_step(layer: nn.Module, x: Tensor, g: Tensor) -> Step:
    inputs = [x, layer.weight, layer.bias]

    def step() -> None:
        torch.autograd.grad(layer(x), inputs, g)

    return step


def bench_layer(rank: int, args: argparse.Namespace) -> list[str]:
    rows = ["| per-rank shape (N,C,H,W) | BN fast ms | BN reference ms | SyncBN ms | "
            "SyncBN / BN fast | SyncBN / BN reference | its 2 all_reduces ms |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for shape in SHAPES:
        torch.manual_seed(rank)
        x = torch.randn(shape).requires_grad_()
        g = torch.randn(shape)
        c = shape[1]
        forward, backward = torch.zeros(2 * c + 1, dtype=torch.float64), torch.zeros(2 * c)

        def reduces(forward: Tensor = forward, backward: Tensor = backward) -> None:
            dist.all_reduce(forward)
            dist.all_reduce(backward)

        t = timed({"fast": layer_step(BatchNorm2d(c), x, g),
                   "reference": layer_step(BatchNorm2d(c, fast=False), x, g),
                   "sync": layer_step(SyncBatchNorm(c), x, g), "reduces": reduces},
                  args.rounds, args.warmup)
        rows.append(f"| {shape} | {t['fast']:.2f} | {t['reference']:.2f} | {t['sync']:.2f} | "
                    f"{t['sync'] / t['fast']:.2f}x | {t['sync'] / t['reference']:.2f}x | "
                    f"{t['reduces']:.3f} |")
    return rows


def bench_cnn(rank: int, args: argparse.Namespace) -> list[str]:
    from bnlab.models import build_model, norm_factory

    world = World(rank, 2, rank, 2)
    batch = 128
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    shard = slice(rank * batch // 2, (rank + 1) * batch // 2)

    def training_step(norm: str, parallel: bool) -> Step:
        torch.manual_seed(0)
        model = build_model("cnn", norm_factory(norm)).to(memory_format=torch.channels_last)
        forward = distributed.wrap(model, world, torch.device("cpu")) if parallel else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        inputs, targets = (x[shard], y[shard]) if parallel else (x, y)

        def step() -> None:
            if not parallel and rank:  # one process alone: rank 1 waits
                return
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(forward(inputs), targets).backward()
            optimizer.step()
            if parallel:
                distributed.average_buffers(world, model)

        return step

    t = timed({"alone": training_step("custom", parallel=False),
               "custom": training_step("custom", parallel=True),
               "sync": training_step("sync", parallel=True)}, args.rounds, args.warmup)
    rows = ["| run | ms per step | images/s | / one process |", "|---|---:|---:|---:|"]
    for name, label in (("alone", "1 process, norm=custom"),
                        ("custom", "2 processes (DDP), norm=custom (per-device BN)"),
                        ("sync", "2 processes (DDP), norm=sync")):
        rows.append(f"| {label} | {t[name]:.1f} | {batch / t[name] * 1e3:.0f} | "
                    f"{t['alone'] / t[name]:.2f}x |")
    return rows


SECTIONS = {"layer": bench_layer, "cnn": bench_cnn}


def worker(rank: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=2)
    try:
        for name in args.section or list(SECTIONS):
            rows = SECTIONS[name](rank, args)
            if rank == 0:
                print(f"\n{name}: median of {args.rounds} rounds, {args.threads} thread(s) per "
                      "process, rank 0's clock\n", flush=True)
                print("\n".join(rows), flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable); default: all")
    args = parser.parse_args()
    args.rounds = args.rounds or (5 if args.quick else 21)
    args.warmup = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo, 2 processes")
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(worker, args=(args, folder), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
