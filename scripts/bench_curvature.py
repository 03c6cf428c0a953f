"""Cost of one Lanczos step of ``bnlab.curvature`` against one training step.

A Lanczos step is one Hessian-vector product (a backward through the kept double-backward
graph, :class:`bnlab.curvature.operator.HessianOperator`) plus the full reorthogonalization
against the basis so far, which grows with the step number. A training step is what
``bnlab train`` does per batch: forward, cross-entropy, ``zero_grad``, backward, SGD step
(momentum 0.9, weight decay 5e-4). Both run on the same model (two copies: the training step
must not move the weights under the kept graph), at the same batch size, in one layout (NHWC by
default, as ``bnlab train`` lays it out on the CPU; ``--layout nchw`` for the other),
interleaved step by step so that the machine's load falls on both alike (training step, Lanczos
step, training step, product alone, ...) over ``--lanczos-steps`` steps of one Lanczos run per
round. The operator's own setup (one forward and one backward with
``create_graph=True``) is timed apart: it is paid once per batch and shared by all measures.

Reported per model and norm: the median training step, the median Lanczos step over all
rounds and steps, their ratio (target: at most 2.5), the ratio of the mean Lanczos step (the
reorthogonalization's growth included), the product alone (``matvec``), and the setup, in
training steps. Inputs are random normal images (the timing does not depend on their values).

Usage::

    python scripts/bench_curvature.py                       # cnn and resnet20, custom and none
    python scripts/bench_curvature.py --models cnn --norms custom,torch,none --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from bnlab.curvature import hessian_operator
from bnlab.curvature.lanczos import Lanczos
from bnlab.models import build_model, norm_factory
from bnlab.registry import load_option


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(model_name: str, norm: str, batch: int, steps: int, rounds: int,
          fmt: torch.memory_format) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name, norm_factory(norm)).to(memory_format=fmt)
    trained = copy.deepcopy(model).train()
    optimizer = load_option("optim", "sgd", lr=0.01).build(trained.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def train_step() -> None:
        loss = F.cross_entropy(trained(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step()  # warm-up (allocator, first-call dispatch)
    train, lanczos, matvec, setup = [], [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        op = hessian_operator(model.train(), F.cross_entropy, x, y)
        setup.append(time.perf_counter() - start)
        run = Lanczos(op.matvec, torch.randn(op.dim, generator=gen), steps, gen)
        v = torch.randn(op.dim, generator=gen)
        while not run.done:
            train.append(timed(train_step))
            lanczos.append(timed(run.step))
            train.append(timed(train_step))
            matvec.append(timed(functools.partial(op.matvec, v)))
    step = statistics.median(train)
    return {"model": model_name, "norm": norm, "params": sum(p.numel() for p in model.parameters()),
            "train_ms": 1e3 * step,
            "lanczos_median": statistics.median(lanczos) / step,
            "lanczos_mean": statistics.mean(lanczos) / step,
            "matvec": statistics.median(matvec) / step,
            "setup": statistics.median(setup) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,resnet20")
    parser.add_argument("--norms", default="custom,none")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lanczos-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layout", choices=("nhwc", "nchw"), default="nhwc")
    args = parser.parse_args()
    fmt = torch.channels_last if args.layout == "nhwc" else torch.contiguous_format
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), batch {args.batch}, {args.layout.upper()}, "
          f"{args.lanczos_steps} Lanczos steps x "
          f"{args.rounds} rounds, interleaved with training steps")
    print("| model | norm | params | train step (ms) | Lanczos step / train step (median) | "
          "(mean, with reorth growth) | HVP alone | operator setup |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for norm in args.norms.split(","):
            r = bench(model_name, norm, args.batch, args.lanczos_steps, args.rounds, fmt)
            print(f"| {r['model']} | {r['norm']} | {r['params']:,} | {r['train_ms']:.1f} | "
                  f"{r['lanczos_median']:.2f} | {r['lanczos_mean']:.2f} | {r['matvec']:.2f} | "
                  f"{r['setup']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
