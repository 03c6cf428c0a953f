"""Benchmark bnlab's normalization zoo against torch's counterparts on CPU (forward + backward).

Section ``layers``: each pair below, one training-mode step ``y = layer(x)`` followed by
``torch.autograd.grad(y, [x, weight, bias], g)`` (running statistics updated where the layer
has them), float32, contiguous NCHW (NHWC with ``--channels-last``), eager,
``torch.set_num_threads(2)`` (``--threads``), glibc
malloc set up as ``bnlab train`` sets it (``keep_freed_memory``), at the shapes of ``SHAPES``:

* ``group32`` / ``group1``: ``bnlab.nn.GroupNorm(32 | 1, C)`` vs ``nn.GroupNorm`` (1 group is
  bnlab's layer norm);
* ``renorm``: ``BatchRenorm2d(C)`` (r_max=3, d_max=5: the corrections are computed) vs
  ``nn.BatchNorm2d``;
* ``ghost32``: ``GhostBatchNorm2d(C, virtual_batch_size=32)`` vs ``nn.BatchNorm2d``;
* ``dbn16`` / ``iter16``: ``DecorrelatedBatchNorm2d(C, group_size=16, whitening="zca" | "iter")``
  vs ``nn.BatchNorm2d``, when ``bnlab.nn.decorrelated`` imports;
* ``frn``, ``evonorm_b0``, ``evonorm_s0``: ``FilterResponseNorm(C)``, ``EvoNormB0(C)``,
  ``EvoNormS0(C, groups=32)`` vs ``nn.BatchNorm2d`` (torch has none of them; BN is what they
  replace). Their TLU / nonlinearity is part of the layer, BN's ReLU is not timed.

Each round runs one step of every layer of a shape, ours and torch's, in turn (so drifts of a
shared machine hit all alike); after warm-up the median over rounds is reported in a markdown
table, with the ratio ours/torch (target: at most 1.5x).

Section ``cnn``: one SGD step of ``model=cnn`` with each norm against ``norm=torch``, all
interleaved (targets: 1.5x for renorm/ghost/group/layer and frn/evonorm_b0/evonorm_s0,
2.0x for dbn/iternorm with ``group_size=16``, 1.05x for custom BN).

Section ``ws``: one forward + backward (gradients of the input, weight, bias and, for Scaled
WS, the gain) of a 3×3 conv, ``bnlab.nn.WSConv2d`` and ``ScaledWSConv2d`` against
``nn.Conv2d``, at the CIFAR ResNets' conv shapes (``WS_SHAPES``, batch 128), NCHW and
channels_last (the layout ``bnlab train`` uses on CPU), interleaved (target: at most 1.3x).

``--clock cpu`` times every section by CPU time (``time.process_time``: this
process, all threads) instead of the wall clock: on a machine shared with other jobs it leaves
out the time spent waiting for a core. More sections go into ``SECTIONS`` (name -> function of
the parsed arguments that prints its tables).

Usage::

    python scripts/bench_norms.py                 # all sections, 21 rounds
    python scripts/bench_norms.py --quick         # 5 rounds
    python scripts/bench_norms.py --only group    # rows whose name contains "group"
    python scripts/bench_norms.py --section ws --threads 1 --quick   # the WS conv step
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnlab.nn.evonorm import EvoNormB0, EvoNormS0
from bnlab.nn.frn import FilterResponseNorm
from bnlab.nn.ghost import GhostBatchNorm2d
from bnlab.nn.groupnorm import GroupNorm
from bnlab.nn.renorm import BatchRenorm2d
from bnlab.runtime import keep_freed_memory

SHAPES = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8)]
TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Pair:
    """A row of the layer table: our layer and torch's counterpart, each made for C channels."""

    name: str
    ours: Callable[[int], nn.Module]
    torch: Callable[[int], nn.Module]


def layer_pairs() -> list[Pair]:
    pairs = [
        Pair("group32", lambda c: GroupNorm(32, c), lambda c: nn.GroupNorm(32, c)),
        Pair("group1", lambda c: GroupNorm(1, c), lambda c: nn.GroupNorm(1, c)),
        Pair("renorm", BatchRenorm2d, nn.BatchNorm2d),
        Pair("ghost32", lambda c: GhostBatchNorm2d(c, virtual_batch_size=32), nn.BatchNorm2d),
        Pair("frn", FilterResponseNorm, nn.BatchNorm2d),
        Pair("evonorm_b0", EvoNormB0, nn.BatchNorm2d),
        Pair("evonorm_s0", lambda c: EvoNormS0(c, groups=32), nn.BatchNorm2d),
    ]
    try:  # written by another part of issue 16; benchmarked once it is there
        from bnlab.nn.decorrelated import DecorrelatedBatchNorm2d
    except ImportError as exc:
        print(f"(decorrelated layers skipped: {exc})")
    else:
        for name, whitening in (("dbn16", "zca"), ("iter16", "iter")):
            pairs.append(Pair(
                name,
                lambda c, w=whitening: DecorrelatedBatchNorm2d(c, group_size=16, whitening=w),
                nn.BatchNorm2d,
            ))
    return pairs


def make_step(layer: nn.Module, x: Tensor, g: Tensor) -> Callable[[], None]:
    inputs = [x, *(p for p in (layer.weight, layer.bias) if p is not None)]

    def step() -> None:
        torch.autograd.grad(layer(x), inputs, g)

    return step


def time_interleaved(steps: dict, rounds: int, warmup: int, clock: str) -> dict:
    """Milliseconds per call of each step over ``rounds`` rounds, one call of each per round,
    by the wall clock or by CPU time (``time.process_time``: this process, all threads)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = now()
            step()
            times[name].append((now() - t0) * 1e3)
    return times


def bench_layers(args: argparse.Namespace) -> None:
    pairs = [p for p in layer_pairs() if args.only is None or args.only in p.name]
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape).mul_(2).add_(0.5).contiguous(memory_format=args.fmt)
        x.requires_grad_()
        g = torch.randn(shape).contiguous(memory_format=args.fmt)
        steps = {}
        for p in pairs:
            steps[(p.name, "ours")] = make_step(p.ours(shape[1]), x, g)
            steps[(p.name, "torch")] = make_step(p.torch(shape[1]), x, g)
        times = time_interleaved(steps, args.rounds, args.warmup, args.clock)
        for p in pairs:
            ours, ref = times[(p.name, "ours")], times[(p.name, "torch")]
            rows.append((p.name, shape, ours, ref))
        print(f"done {shape}", flush=True)

    order = [p.name for p in pairs]
    rows.sort(key=lambda r: order.index(r[0]))
    print(f"\n{args.clock} ms per forward+backward over {args.rounds} rounds, median and minimum "
          f"(the least-disturbed run); target ours/torch <= {TARGET_RATIO}x:\n")
    print("| layer | shape (N,C,H,W) | ours ms | torch ms | ours/torch | ours min | torch min "
          "| ours/torch (min) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, shape, ours, ref in rows:
        med, low = (statistics.median(ours), statistics.median(ref)), (min(ours), min(ref))
        print(f"| {name} | {shape} | {med[0]:.2f} | {med[1]:.2f} | {_ratio(*med)} "
              f"| {low[0]:.2f} | {low[1]:.2f} | {_ratio(*low)} |")


def _ratio(ours: float, ref: float) -> str:
    return f"{ours / ref:.2f}x" + ("" if ours / ref <= TARGET_RATIO else " (!)")


# Step-time targets of a model=cnn training step, relative to norm=torch (issues 16, 23, 26).
CNN_TARGETS = {"renorm": 1.5, "ghost": 1.5, "group": 1.5, "layer": 1.5, "dbn": 2.0,
               "iternorm": 2.0, "custom": 1.05, "none": 1.5, "frn": 1.5, "evonorm_b0": 1.5,
               "evonorm_s0": 1.5}


def bench_cnn(args: argparse.Namespace) -> None:
    """One SGD step of ``model=cnn`` (the config defaults, batch 128, channels_last as ``bnlab
    train`` uses on CPU) with each norm, all norms' steps interleaved on the same batch."""
    from bnlab.models import build_model, norm_factory

    torch.manual_seed(0)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    norms = ["torch", *(n for n in CNN_TARGETS if args.only is None or args.only in n)]
    steps = {}
    for name in norms:
        torch.manual_seed(0)
        model = build_model("cnn", norm_factory(name)).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[name] = step
    times = time_interleaved(steps, args.rounds, args.warmup, args.clock)
    base, base_min = statistics.median(times["torch"]), min(times["torch"])
    print(f"\nmodel=cnn training step (batch 128, channels_last), {args.clock} ms over "
          f"{args.rounds} rounds; ratio to norm=torch (target in the last column):\n")
    print("| norm | ms (median) | / torch | ms (min) | / torch (min) | target |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in norms:
        med, low = statistics.median(times[name]), min(times[name])
        target = CNN_TARGETS.get(name, 1.0)
        flag = "" if med / base <= target else " (!)"
        print(f"| {name} | {med:.1f} | {med / base:.2f}x{flag} | {low:.1f} | "
              f"{low / base_min:.2f}x | {target}x |")


# The 3×3 convs of the CIFAR ResNets (width 16), (N, C, H, W) of their input and output.
WS_SHAPES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
WS_TARGET = 1.3


def _conv_step(conv: nn.Module, x: Tensor, g: Tensor) -> Callable[[], None]:
    inputs = [x, *conv.parameters()]  # the gain of Scaled WS too

    def step() -> None:
        torch.autograd.grad(conv(x), inputs, g)

    return step


def bench_ws(args: argparse.Namespace) -> None:
    """A conv step with weight standardization against the plain conv (the same weight)."""
    from bnlab.nn import ScaledWSConv2d, WSConv2d

    classes = {"conv": nn.Conv2d, "ws": WSConv2d, "scaled": ScaledWSConv2d}
    rows = []
    for shape in WS_SHAPES:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format),
                              ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
            g = torch.randn(shape).contiguous(memory_format=fmt)
            steps = {}
            for name, cls in classes.items():
                torch.manual_seed(1)
                conv = cls(shape[1], shape[1], 3, padding=1).to(memory_format=fmt)
                steps[name] = _conv_step(conv, x, g)
            times = time_interleaved(steps, args.rounds, args.warmup, args.clock)
            rows.append((shape, fmt_name, times))
        print(f"done {shape}", flush=True)
    print(f"\n3×3 conv, forward + backward, {args.clock} ms over {args.rounds} rounds (median; "
          f"minimum in brackets); target ws/conv and scaled/conv <= {WS_TARGET}x:\n")
    print("| shape (N,C,H,W) | layout | conv ms | ws ms | ws/conv | scaled ms | scaled/conv |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, fmt_name, times in rows:
        med = {name: statistics.median(t) for name, t in times.items()}
        low = {name: min(t) for name, t in times.items()}
        cells = [f"{med['conv']:.2f} [{low['conv']:.2f}]"]
        for name in ("ws", "scaled"):
            ratio = med[name] / med["conv"]
            flag = "" if ratio <= WS_TARGET else " (!)"
            cells += [f"{med[name]:.2f} [{low[name]:.2f}]",
                      f"{ratio:.2f}x{flag} [{low[name] / low['conv']:.2f}x]"]
        print(f"| {shape} | {fmt_name} | {' | '.join(cells)} |")


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"layers": bench_layers,
                                                             "cnn": bench_cnn, "ws": bench_ws}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--only", default=None, help="rows whose name contains this")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is less disturbed by a busy machine)")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="run only this section (repeatable); default: all")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC inputs in the layers section (what bnlab train feeds on CPU)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall clock, or CPU time (less disturbed on a shared machine)")
    args = parser.parse_args()
    args.fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    args.rounds = args.rounds or (5 if args.quick else 21)
    args.warmup = 2 if args.quick else 3

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    layout = "NHWC" if args.channels_last else "NCHW"
    print(f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, "
          f"float32, layers in {layout}, training-mode forward+backward, eager, {args.clock} clock")
    # Other processes on the machine distort timings; record how busy it was.
    print("load average (1/5/15 min) at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for name in args.section or SECTIONS:
        SECTIONS[name](args)
    print("\nload average (1/5/15 min) at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
