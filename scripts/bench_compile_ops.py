"""Which ops make ``compile=true`` slower on this CPU: eager vs ``torch.compile`` per op.

Each row times one training-mode forward + backward of a single op (or a short chain as it
appears in the cnn: norm, ReLU, 2×2 max-pool) on a (128, 32, 32, 32) float32 NHWC input, the
cnn's first stage, eager against ``torch.compile`` of the same function (default Inductor
backend), interleaved rounds, median, 2 threads, malloc set up as in ``bnlab train``. A ratio
above 1 means the compiled op is slower. ``F.max_pool2d`` rows show Inductor's own pooling
kernel; ``bnlab MaxPool2d`` rows the layer bnlab's models use, which keeps ATen's kernel under
compile on CPU.

Usage::

    python scripts/bench_compile_ops.py
    python scripts/bench_compile_ops.py --rounds 31 --simdlen 1   # Inductor without SIMD
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnlab.nn import BatchNorm2d, MaxPool2d
from bnlab.runtime import keep_freed_memory

SHAPE = (128, 32, 32, 32)


def cases() -> dict[str, Callable[[Tensor], Tensor]]:
    custom, native, pool = BatchNorm2d(SHAPE[1]), nn.BatchNorm2d(SHAPE[1]), MaxPool2d(2)
    return {
        "relu": F.relu,
        "max_pool2d": lambda x: F.max_pool2d(x, 2),
        "bnlab MaxPool2d (ATen's kernel when compiled)": pool,
        "relu + max_pool2d": lambda x: F.max_pool2d(F.relu(x), 2),
        "relu + bnlab MaxPool2d": lambda x: pool(F.relu(x)),
        "custom BN": custom,
        "torch BN": native,
        "custom BN + relu + max_pool2d": lambda x: F.max_pool2d(F.relu(custom(x)), 2),
        "torch BN + relu + max_pool2d": lambda x: F.max_pool2d(F.relu(native(x)), 2),
        "custom BN + relu + bnlab MaxPool2d": lambda x: pool(F.relu(custom(x))),
    }


def timed_step(fn: Callable[[Tensor], Tensor], x: Tensor) -> float:
    t0 = time.perf_counter()
    y = fn(x)
    torch.autograd.grad(y, x, torch.ones_like(y))  # no accumulation into x.grad
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--simdlen", type=int, default=None,
                        help="Inductor's cpp.simdlen (1: scalar C++ code)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    if args.simdlen is not None:
        inductor_config.cpp.simdlen = args.simdlen
    torch.manual_seed(0)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    print(f"torch {torch.__version__}, threads 2, input {SHAPE} NHWC, "
          f"Inductor simdlen {inductor_config.cpp.simdlen}, {args.rounds} rounds\n")
    print("| op (forward + backward) | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    for name, fn in cases().items():
        sides = {"eager": fn, "compiled": torch.compile(fn)}
        for side in sides.values():  # warm-up, compilation included
            for _ in range(3):
                timed_step(side, x)
        times: dict[str, list[float]] = {s: [] for s in sides}
        for _ in range(args.rounds):
            for s, side in sides.items():
                times[s].append(timed_step(side, x) * 1e3)
        eager, compiled = (statistics.median(times[s]) for s in sides)
        print(f"| {name} | {eager:.2f} | {compiled:.2f} | {compiled / eager:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
