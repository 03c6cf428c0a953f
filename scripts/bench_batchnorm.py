"""Benchmark bnlab.nn.BatchNorm2d against torch.nn.BatchNorm2d on CPU (forward + backward).

What is timed, per variant and shape: one training-mode step ``y = layer(x)`` followed by
``torch.autograd.grad(y, [x, weight, bias], g)`` (running statistics are updated too), float32,
contiguous NCHW (NHWC with ``--channels-last``), ``torch.set_num_threads(2)``, and glibc malloc
set up as ``bnlab train`` sets it (``keep_freed_memory``: freed activations are reused, not
faulted in again), so allocation costs are those of a training step.

Variants:

* ``torch``:  ``nn.BatchNorm2d`` in eager mode (native CPU kernel);
* ``custom``: ``bnlab.nn.BatchNorm2d`` in eager mode: its eager fast path
  (``bnlab/nn/batchnorm_fast.py``), what ``bnlab train`` runs;
* ``reference``: the same layer with ``fast=False`` (``norm.fast=false``), i.e. the reference
  implementation (``bnlab/nn/batchnorm.py``: plain tensor ops, hand-derived backward);
* ``naive``:  a textbook Python BN differentiated by autograd;
* ``torch+compile`` / ``custom+compile``: ``torch.compile(layer)`` of each layer (default
  Inductor backend, static shapes); the compiled forward and the AOT-compiled backward are
  both inside the timed step.

Repetitions are interleaved (one step of every variant per round) so that drifts of the machine
hit all variants alike; after warm-up the median over rounds is reported, and a second table
gives the minimum over rounds (the least-disturbed run, useful on a shared, busy machine).
Ratios are variant/torch time (lower is better; < 1 means the variant is faster). Each step's
CPU time (``time.process_time``: this process, all its threads) is measured too, and reported
as medians and as the median of per-round ratios: on a machine shared with other jobs it
leaves out the time spent waiting for a core, most of the wall clock's noise.

Usage::

    python3 scripts/bench_batchnorm.py            # full run (several minutes: compile)
    python3 scripts/bench_batchnorm.py --quick    # fewer rounds
    python3 scripts/bench_batchnorm.py --no-compile
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnlab.nn import BatchNorm2d
from bnlab.runtime import keep_freed_memory

SHAPES = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]


class NaiveBatchNorm2d(nn.Module):
    """Textbook batch norm, backward by autograd through the forward (reference only)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
        if self.training:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.flatten())
                self.running_var.mul_(1 - m).add_(m * var.flatten() * n / (n - 1))
        x_hat = (x - mean) / torch.sqrt(var + self.eps)
        return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def make_step(layer: nn.Module, run: Callable[[Tensor], Tensor], x: Tensor, g: Tensor):
    params = [x, layer.weight, layer.bias]

    def step() -> None:
        y = run(x)
        torch.autograd.grad(y, params, g)

    return step


def bench_shape(
    shape: tuple[int, ...], rounds: int, warmup: int, compile_: bool, fmt: torch.memory_format
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU milliseconds per step of every variant, over ``rounds`` rounds."""
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(shape).mul_(2).add_(0.5).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape).contiguous(memory_format=fmt)
    layers: dict[str, nn.Module] = {
        "torch": nn.BatchNorm2d(c),
        "custom": BatchNorm2d(c),
        "naive": NaiveBatchNorm2d(c),
    }
    steps = {name: make_step(m, m, x, g) for name, m in layers.items()}
    reference = BatchNorm2d(c, fast=False)
    steps["reference"] = make_step(reference, reference, x, g)
    if compile_:
        for name in ("torch", "custom"):
            m = type(layers[name])(c)
            compiled = torch.compile(m)
            steps[f"{name}+compile"] = make_step(m, compiled, x, g)
    for step in steps.values():  # warm-up (includes compilation)
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return times, cpu


def print_table(title: str, rows: list[tuple[tuple[int, ...], dict[str, float]]], compile_: bool):
    print(f"\n{title}\n")
    header = (
        f"| {'shape (N,C,H,W)':<18} | torch ms | custom ms | custom/torch | reference ms "
        "| reference/torch | naive ms | naive/torch"
    )
    if compile_:
        header += " | torch+compile ms | custom+compile ms | custom/torch (compiled)"
    print(header + " |")
    print("|" + "|".join("---" for _ in header.split("|")[1:]) + "|")
    for shape, r in rows:
        row = (
            f"| {shape!s:<18} | {r['torch']:8.2f} | {r['custom']:9.2f} | "
            f"{r['custom'] / r['torch']:11.2f}x | {r['reference']:12.2f} | "
            f"{r['reference'] / r['torch']:14.2f}x | {r['naive']:8.2f} | "
            f"{r['naive'] / r['torch']:10.2f}x"
        )
        if compile_:
            row += (
                f" | {r['torch+compile']:16.2f} | {r['custom+compile']:17.2f} | "
                f"{r['custom+compile'] / r['torch+compile']:22.2f}x"
            )
        print(row + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC inputs (what bnlab train uses on CPU) instead of NCHW")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is less disturbed by a busy machine)")
    args = parser.parse_args()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    rounds = args.rounds or (7 if args.quick else 31)
    warmup = 2 if args.quick else 5
    compile_ = not args.no_compile

    print(
        f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, "
        f"float32 {'NHWC' if args.channels_last else 'NCHW'}, training-mode forward+backward, "
        f"{rounds} interleaved rounds "
        f"after {warmup} warm-up steps"
    )
    # Other processes on the machine distort timings; record how busy it was.
    print("load average (1/5/15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    medians, minima, cpu_medians, ratios = [], [], [], []
    for shape in SHAPES:
        times, cpu = bench_shape(shape, rounds, warmup, compile_, fmt)
        medians.append((shape, {k: statistics.median(v) for k, v in times.items()}))
        minima.append((shape, {k: min(v) for k, v in times.items()}))
        cpu_medians.append((shape, {k: statistics.median(v) for k, v in cpu.items()}))
        ratios.append((shape, {k: statistics.median(a / b for a, b in zip(v, cpu["torch"],
                                                                          strict=True))
                               for k, v in cpu.items()}))
        print(f"done {shape}", flush=True)
    print_table("Median over rounds (wall ms):", medians, compile_)
    print_table("Minimum over rounds (wall ms):", minima, compile_)
    # CPU time (this process, all threads) leaves out the time the process waited for a core,
    # which on a shared machine is most of the noise of the wall clock.
    print_table("Median over rounds (CPU ms):", cpu_medians, compile_)
    print_table("Median of per-round CPU-time ratios (each 'ms' column: ratio to torch):",
                ratios, compile_)
    print("\nload average (1/5/15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
