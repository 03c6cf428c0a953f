"""``compile=true``: does ``torch.compile`` work for every model and norm, match eager, and help?

For each model (cnn, vgg11, vgg16, resnet20) and norm (custom, torch, none, noisy), built with
``bnlab.models.build_model`` exactly as ``bnlab train`` builds it, in the layout its
``channels_last=auto`` picks on CPU (NHWC; ``--memory-format contiguous`` for NCHW), an eager
model and a compiled copy (``bnlab.runtime.compile_model``, what ``bnlab train compile=true`` runs:
``torch.compile`` with the default Inductor backend, ATen's random numbers on CPU) are:

1. checked on one fixed batch: training-mode output, loss, every parameter gradient and the
   updated running statistics, then eval-mode output, each against a float64 copy of the eager
   model (same weights, same batch), as relative errors ``max|t - t64| / max|t64|``. Float32
   gradients of these nets at initialization are ill-conditioned (BN's backward subtracts
   nearly equal sums): ``torch.nn.BatchNorm2d`` in eager float32 is up to a few 1e-2 off float64
   in some early-layer gradients, while bnlab's eager custom BN (its own CPU formulas and
   summation order) is often closer; compiled, the custom BN runs its functional formulas and
   lands at torch's float32 accuracy. So the yardstick of "float tolerance" per tensor is the larger
   error of eager float32 and of the same weights under torch's native BN in eager float32
   (custom and noisy state dicts load into it; for ``torch`` and ``none`` it is eager itself):
   the compiled model matches when its error is at most twice that, plus 1e-5. The table gives
   the largest errors over all tensors. ``noisy`` draws random noise in the forward; its check
   runs with zero-magnitude noise (the same code path, the noise draws included, but a result
   that does not depend on the draws) and it is timed with the default noise. (With
   ``compile_model``'s ATen random numbers the compiled draws equal eager's anyway;
   ``tests/test_compile.py`` checks that.) Where float32 rounding blurs the picture (deep nets at
   initialization), the float64 column settles whether compile computes the same function: the
   float64 model compiled against the same model eager, where rounding is ~1e-16;
2. timed: one training step (forward, cross-entropy, backward, SGD step with momentum and weight
   decay) on a batch of ``--batch`` images, ``torch.set_num_threads(--threads)``, glibc malloc
   set up as ``bnlab train`` sets it (``keep_freed_memory``); rounds
   alternate eager and compiled steps (compiled first every other round), after warm-up steps that
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
import copy
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import FORMATS, make_model

from bnlab.registry import option_names
from bnlab.runtime import compile_model, keep_freed_memory


@dataclass
class Result:
    model: str
    norm: str
    errs: dict[str, float]
    eager_ms: float
    compiled_ms: float
    speedup: float
    compile_s: float
    eval_compile_s: float


CPU = torch.device("cpu")
SILENT_NOISE = {"mean_range": 0.0, "std_range": (1.0, 1.0), "mean_jitter": 0.0,
                "std_jitter": 0.0}


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


def outputs(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor
            ) -> list[torch.Tensor]:
    out = [t.detach().clone() for t in train_outputs(model, forward, x, y)]
    return [*out, eval_output(model, forward, x)]


def check(model_name: str, norm: str, x: torch.Tensor, y: torch.Tensor,
          fmt: torch.memory_format) -> tuple[dict[str, float], float, float]:
    """Errors vs float64 (eager, compiled) and compiled vs eager; the two compile times (s)."""
    noise = SILENT_NOISE if norm == "noisy" else None
    eager = make_model(model_name, norm, fmt, noise=noise)
    initial = copy.deepcopy(eager.state_dict())
    ref64 = copy.deepcopy(eager).double()
    compiled64_model = copy.deepcopy(ref64)
    compiled_model = copy.deepcopy(eager)
    compiled = compile_model(compiled_model, CPU)
    t0 = time.perf_counter()
    got_train = train_outputs(compiled_model, compiled, x, y)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got_eval = eval_output(compiled_model, compiled, x)
    eval_compile_s = time.perf_counter() - t0
    got = [*got_train, got_eval]
    ref = outputs(eager, eager, x, y)
    exact = outputs(ref64, ref64, x.double(), y)
    e_eager = [rel_err(t64, t) for t64, t in zip(exact, ref, strict=True)]
    e_native = e_eager
    if norm in ("custom", "noisy"):
        native = make_model(model_name, "torch", fmt)
        native.load_state_dict(initial)
        e_native = [rel_err(t64, t)
                    for t64, t in zip(exact, outputs(native, native, x, y), strict=True)]
    got64 = outputs(compiled64_model, compile_model(compiled64_model, CPU), x.double(), y)
    e_comp = [rel_err(t64, t) for t64, t in zip(exact, got, strict=True)]
    tol = [2 * max(e, n) + 1e-5 for e, n in zip(e_eager, e_native, strict=True)]
    errs = {"eager_vs_f64": max(e_eager), "native_vs_f64": max(e_native),
            "compiled_vs_f64": max(e_comp),
            "compiled_vs_eager": max(rel_err(a, b) for a, b in zip(ref, got, strict=True)),
            "f64_compiled_vs_eager": max(rel_err(a, b)
                                         for a, b in zip(exact, got64, strict=True)),
            "ok": float(all(c <= t for c, t in zip(e_comp, tol, strict=True)))}
    return errs, compile_s, eval_compile_s


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
    fmt = FORMATS[args.memory_format]
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    errs, compile_s, eval_compile_s = check(model_name, norm, x, y, fmt)
    torch._dynamo.reset()
    eager = make_model(model_name, norm, fmt)
    compiled_model = copy.deepcopy(eager)
    compiled = compile_model(compiled_model, CPU)
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
    return Result(model_name, norm, errs, statistics.median(times["eager"]) * 1e3,
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
    parser.add_argument("--models", nargs="+", choices=option_names("model"), default=None)
    parser.add_argument("--norms", nargs="+", choices=option_names("norm"),
                        default=option_names("norm"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-format", choices=list(FORMATS),
                        default="channels_last",
                        help="model and batch layout (default: what bnlab's channels_last=auto "
                             "picks on CPU)")
    parser.add_argument("--no-end-to-end", action="store_true")
    args = parser.parse_args()
    args.models = args.models or (["cnn"] if args.quick else option_names("model"))
    args.rounds = args.rounds or (3 if args.quick else 7)
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    print(f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}, "
          f"batch {args.batch}, {args.memory_format}, train step = fwd + cross-entropy + bwd + "
          f"SGD step, median of "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps")
    print("| model | norm | eager vs f64 | native BN vs f64 | compiled vs f64 | compiled vs eager "
          "| match | f64: compiled vs eager | eager ms | compiled ms | speed-up "
          "| compile s (train / eval) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = []
    for model_name in args.models:
        for norm in args.norms:
            try:
                r = bench_case(model_name, norm, args)
            except Exception as e:  # report and go on: one broken case must not hide the rest
                failed.append(f"{model_name}/{norm}")
                print(f"| {model_name} | {norm} | error: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120]} | | | | no | | | | | |", flush=True)
                continue
            ok = bool(r.errs["ok"])
            if not ok:
                failed.append(f"{model_name}/{norm}")
            print(f"| {r.model} | {r.norm} | {r.errs['eager_vs_f64']:.1e} | "
                  f"{r.errs['native_vs_f64']:.1e} | {r.errs['compiled_vs_f64']:.1e} | "
                  f"{r.errs['compiled_vs_eager']:.1e} | "
                  f"{'yes' if ok else 'NO'} | {r.errs['f64_compiled_vs_eager']:.1e} | "
                  f"{r.eager_ms:.1f} | {r.compiled_ms:.1f} | "
                  f"{r.speedup:.2f}× | {r.compile_s:.0f} / {r.eval_compile_s:.0f} |", flush=True)
    if not args.no_end_to_end:
        end_to_end()
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
