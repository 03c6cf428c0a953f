"""``compile=true``: does ``torch.compile`` work for every model and norm, match eager, and help?

For each model (cnn, vgg11, vgg16, resnet20) and norm (custom, torch, none, noisy), built with
``bnlab.models.build_model`` exactly as ``bnlab train`` builds it, an eager model and a
``torch.compile`` d copy (default Inductor backend, as ``bnlab.train.Trainer`` does it) are:

1. checked on one fixed batch: training-mode output, loss, every parameter gradient and the
   updated running statistics, then eval-mode output, compiled vs eager. The figure reported is
   the largest ``max|compiled - eager| / max|eager|`` over all of these tensors; a case passes
   when it is below ``--tol`` (1e-3). ``noisy`` draws random noise inside the forward: for it,
   ``torch._inductor.config.fallback_random`` is on, so the compiled graph draws from torch's
   own generator and both sides see the same noise (with Inductor's own RNG they cannot match);
2. timed: one training step (forward, cross-entropy, backward, SGD step with momentum and weight
   decay) on a batch of ``--batch`` images, ``torch.set_num_threads(--threads)``; rounds
   alternate eager and compiled steps (compiled first in odd rounds), after warm-up steps that
   include the compilation. The speed-up is the median over rounds of eager time / compiled
   time for the same round.

Compile times (first forward + backward, and the eval-mode recompile) are reported too; they
depend heavily on whether Inductor's on-disk cache is warm.

Last, ``bnlab train compile=true`` is run end to end (a short run on the synthetic set) and
compared with the same run eager.

Usage::

    python scripts/bench_compile.py               # all 16 cases (a long run on CPU: compiles)
    python scripts/bench_compile.py --quick       # model=cnn, every norm, fewer rounds
    python scripts/bench_compile.py --models cnn resnet20 --norms custom torch
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnlab.models import MODELS, NORMS, build_model, norm_factory  # noqa: E402


@dataclass
class Result:
    model: str
    norm: str
    max_rel_err: float
    eager_ms: float
    compiled_ms: float
    speedup: float
    compile_s: float
    eval_compile_s: float


def make_model(model: str, norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model, norm_factory(norm), init="kaiming")


@contextlib.contextmanager
def same_rng_as_eager(on: bool) -> Iterator[None]:
    """For ``noisy``: make compiled code draw its noise from torch's generator, as eager does."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = a.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def train_outputs(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor
                  ) -> list[torch.Tensor]:
    """Training-mode output, loss, gradients and buffers after one forward/backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same noise for noisy BN on both sides
    out = forward(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    return [out, loss, *grads, *model.buffers()]


def eval_output(model: nn.Module, forward: Callable, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = forward(x)
    model.train()
    return out


def check(eager: nn.Module, compiled_model: nn.Module, compiled: Callable, x: torch.Tensor,
          y: torch.Tensor) -> tuple[float, float, float]:
    """Max relative error over all compared tensors, and the two compile times (s)."""
    ref = train_outputs(eager, eager, x, y)
    t0 = time.perf_counter()
    got = train_outputs(compiled_model, compiled, x, y)
    compile_s = time.perf_counter() - t0
    errs = [rel_err(a, b) for a, b in zip(ref, got, strict=True)]
    ref_eval = eval_output(eager, eager, x)
    t0 = time.perf_counter()
    got_eval = eval_output(compiled_model, compiled, x)
    eval_compile_s = time.perf_counter() - t0
    errs.append(rel_err(ref_eval, got_eval))
    return max(errs), compile_s, eval_compile_s


def make_step(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor
              ) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_case(model_name: str, norm: str, args: argparse.Namespace) -> Result:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    with same_rng_as_eager(norm == "noisy"):
        eager = make_model(model_name, norm)
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model)
        err, compile_s, eval_compile_s = check(eager, compiled_model, compiled, x, y)
        steps = {"eager": make_step(eager, eager, x, y),
                 "compiled": make_step(compiled_model, compiled, x, y)}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.rounds):
            for name in (["eager", "compiled"] if r % 2 == 0 else ["compiled", "eager"]):
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
    return Result(model_name, norm, err, statistics.median(times["eager"]) * 1e3,
                  statistics.median(times["compiled"]) * 1e3, statistics.median(ratios),
                  compile_s, eval_compile_s)


def end_to_end() -> None:
    """``bnlab train compile=true`` vs eager, a short synthetic run each (compile included)."""
    print("\n## bnlab train compile=true, end to end (data=synthetic epochs=2, compile time "
          "included in images/s)")
    print("| compile | status | final train loss | final test acc | images/s |")
    print("|---|---|---|---|---|")
    for flag in ("false", "true"):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "bnlab.cli", "train", "data=synthetic", "epochs=2",
                   "probe=off", "progress=false", f"compile={flag}", f"hydra.run.dir={tmp}/run"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"| {flag} | exit {proc.returncode}: {proc.stderr.strip()[-200:]} | | | |")
                continue
            m = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
            print(f"| {flag} | {m['status']} | {m['final_train_loss']:.4f} | "
                  f"{m['final_test_acc']:.4f} | {m['images_per_s']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="model=cnn only, fewer rounds")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None)
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    args.models = args.models or (["cnn"] if args.quick else list(MODELS))
    args.rounds = args.rounds or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, "
          f"batch {args.batch}, train step = fwd + cross-entropy + bwd + SGD step, median of "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps")
    print("| model | norm | max rel. err vs eager | match | eager ms | compiled ms | speed-up "
          "| compile s (train / eval) |")
    print("|---|---|---|---|---|---|---|---|")
    failed = []
    for model_name in args.models:
        for norm in args.norms:
            try:
                r = bench_case(model_name, norm, args)
            except Exception as e:  # report and go on: one broken case must not hide the rest
                failed.append(f"{model_name}/{norm}")
                print(f"| {model_name} | {norm} | error: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]} | no | | | | |", flush=True)
                continue
            ok = r.max_rel_err < args.tol
            if not ok:
                failed.append(f"{model_name}/{norm}")
            print(f"| {r.model} | {r.norm} | {r.max_rel_err:.1e} | {'yes' if ok else 'NO'} | "
                  f"{r.eager_ms:.1f} | {r.compiled_ms:.1f} | {r.speedup:.2f}× | "
                  f"{r.compile_s:.0f} / {r.eval_compile_s:.0f} |", flush=True)
    if not args.no_end_to_end:
        end_to_end()
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
