"""The ``bnlab`` command: ``train`` and ``signal`` (Hydra apps, see :mod:`bnlab.hydra_app`),
``compare``, ``plot`` and ``curvature``.

``bnlab train`` and ``bnlab signal`` hand their arguments to Hydra untouched. User mistakes — a
bad override, an unknown config option, missing data, a path that is not a run dir — end in one
``error: ...`` line and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml

from bnlab.errors import UsageError
from bnlab.hydra_app import fail, run_command
from bnlab.registry import option_names

TRAIN_HELP = """Train one run, or a sweep with -m. Arguments are Hydra overrides, passed on as is.

\b
Examples:
  bnlab train data.root=../shared/data/cifar10-subset
  bnlab train norm=torch optim.lr=0.1 model.dropout=0.5 epochs=20
  bnlab train -m norm=custom,torch,none optim.lr=0.01,0.1,1 model.dropout=0,0.5
  bnlab train experiment=lr_stability              (a preset sweep; no -m needed)
  bnlab train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 seed=0,1,2,3
  bnlab train resume=outputs/runs/2026-11-23_10-00-00   (continue an interrupted run)
  bnlab train --cfg job                             (print the composed config)
  bnlab train --info                                (Hydra's config search path and groups)

\b
Config groups: {groups}.
Top-level keys: seed, epochs, batch_size, device, compile, amp, resume, overwrite, ...
See README.md for every key.
Hydra's own flags (--cfg, --info, --hydra-help, -m, --multirun, ...) work as usual.""".format(
    groups="; ".join(f"{g} ({', '.join(option_names(g))})" for g in
                     ("data", "model", "norm", "optim", "sched", "probe", "experiment")))

SIGNAL_HELP = """Measure signal propagation at initialization, without training.

Signal Propagation Plots per residual block, sample similarity and Gram rank per layer, and
per-layer gradient norms with their fitted growth rate, over a few seeds and batches; writes
signal.json and figures (spp.png, gram.png, gradients.png) to the run dir. Arguments are Hydra
overrides, passed on as is (sweeps with -m, as for train).

\b
Examples:
  bnlab signal data.root=../shared/data/cifar10-subset model=resnet20
  bnlab signal -m data=synthetic model=cnn model.depth=1,2,4 norm=custom,none,layer
  bnlab signal signal.checkpoint=outputs/runs/<time> model=resnet20   (a trained run's weights)
  bnlab signal signal.seeds=5 signal.batches=4 signal.samples=32 batch_size=64

\b
Config groups: {groups}.
Keys: seed, batch_size, device, threads, channels_last, deterministic, overwrite,
signal.seeds, signal.batches, signal.samples, signal.checkpoint. See README.md.""".format(
    groups="; ".join(f"{g} ({', '.join(option_names(g))})" for g in ("data", "model", "norm")))

app = typer.Typer(
    help="bnlab: study internal covariate shift and batch normalization on CIFAR-10.\n\n"
    "train runs experiments (Hydra overrides, sweeps with -m), signal measures signal "
    "propagation at initialization, compare summarizes sweeps, plot draws activation-"
    "distribution, gradient, drift and ICS figures (and overlays signal runs), curvature "
    "measures a checkpoint's Hessian.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

def _resume_args(args: list[str]) -> list[str]:
    """``resume=RUN_DIR``: continue that run with its own recorded overrides, in place."""
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key != "resume" or value.lower() in ("true", "false"):
            out.append(arg)
            continue
        overrides = Path(value) / ".hydra" / "overrides.yaml"
        if not overrides.is_file():
            raise UsageError(f"resume={value}: not a run dir ({overrides} is missing); "
                             "use resume=true with the run's overrides, or a run dir")
        # overwrite= too: resuming must never delete the progress it resumes from.
        saved = [o for o in yaml.safe_load(overrides.read_text()) or []
                 if not o.startswith(("resume=", "overwrite=", "hydra.run.dir="))]
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        out += [*saved, f"hydra.run.dir='{quoted}'", "resume=true"]
    return out


@app.command(help=TRAIN_HELP, context_settings={"allow_extra_args": True,
                                                "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    try:
        args = _resume_args(list(ctx.args))
    except UsageError as e:
        fail(e)
    run_command("train", args)


@app.command(help=SIGNAL_HELP, context_settings={"allow_extra_args": True,
                                                 "ignore_unknown_options": True})
def signal(ctx: typer.Context) -> None:
    run_command("signal", list(ctx.args))


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="Sweep dirs, run dirs, or folders of them.")],
    fmt: Annotated[str, typer.Option("--format", "-f",
                                     help="table, csv, markdown or json.")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write the table to this file.")] = None,
    figure: Annotated[Path | None, typer.Option(
        help="Accuracy-vs-learning-rate figure (default: next to the table).")] = None,
) -> None:
    """Compare runs of sweeps: accuracy, divergence, gradients, drift and ICS per setting,
    with seeds aggregated, and the largest stable learning rate per norm."""
    from bnlab.analysis.compare import run_compare

    try:
        run_compare(paths, fmt=fmt, out=out, figure=figure)
    except UsageError as e:
        fail(e)


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run dirs, one panel each.")],
    out: Annotated[Path | None, typer.Option(help="Figure file (.png or .svg).")] = None,
    layer: Annotated[list[str] | None, typer.Option(
        help="Layer (module path) to draw; repeat for several. Default: shallow, middle, deep.")
    ] = None,
    step: Annotated[list[int] | None, typer.Option(
        help="Step of a histogram snapshot; repeat for several.")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Show what the runs logged.")] = False,
    curvature: Annotated[bool, typer.Option(
        "--curvature", help="Overlay the runs' Hessian densities and top eigenvalues (their "
        "curvature.json, or such files given instead of run dirs).")] = False,
) -> None:
    """Figures of a run's activation percentiles (Ioffe & Szegedy Fig. 1), gradient norms,
    drift, ICS and histogram snapshots, runs side by side; or, with --curvature, the
    curvature results of several runs overlaid."""
    from bnlab.analysis.plot import run_plot

    if out is None and not list_only:
        fail(UsageError("--out FILE.png (or .svg) is required unless --list is given"))
    try:
        run_plot(run_dirs, out, layers=layer, steps=step, list_only=list_only,
                 curvature=curvature)
    except UsageError as e:
        fail(e)


@app.command(name="curvature")
def curvature_command(
    run_dir: Annotated[Path, typer.Argument(help="A run dir with a checkpoint.")],
    epoch: Annotated[int | None, typer.Option(
        help="A kept epoch's checkpoint (keep_epoch_checkpoints); default: the latest.")] = None,
    bn: Annotated[str, typer.Option(help="Norm statistics: batch, running or population.")
                  ] = "batch",
    batch_size: Annotated[int, typer.Option(help="Training images measured on.")] = 256,
    k: Annotated[int, typer.Option("--k", help="Top eigenvalues (and overlap subspace).")] = 10,
    iters: Annotated[int, typer.Option(help="Most Lanczos steps for the top k.")] = 100,
    tol: Annotated[float, typer.Option(help="Relative residual of the top k.")] = 1e-3,
    samples: Annotated[int, typer.Option(help="Hutchinson probes of the trace.")] = 50,
    runs: Annotated[int, typer.Option(help="Lanczos runs of the density.")] = 1,
    steps: Annotated[int, typer.Option(help="Lanczos steps per density run.")] = 80,
    params: Annotated[list[str] | None, typer.Option(
        help="Module path or parameter name of a block; repeat for a union. Default: all.")
    ] = None,
    population_batches: Annotated[int | None, typer.Option(
        help="Training batches for --bn population; default: one epoch.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random probe vectors.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's).")] = None,
    data_root: Annotated[str | None, typer.Option(help="Where the run's data is now.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="The JSON file (default RUN_DIR/curvature.json); the figure goes next to it.")
    ] = None,
) -> None:
    """The Hessian of a checkpoint's training loss: top eigenvalues, trace, eigenvalue density
    and the gradient's overlap with the top eigenspace, with batch, running or population
    statistics (bnlab.curvature), into curvature.json and a figure."""
    import torch

    from bnlab.curvature.command import Settings, run_curvature

    if threads is not None:
        if threads < 1:
            fail(UsageError(f"--threads {threads} is invalid; allowed: an integer >= 1"))
        torch.set_num_threads(threads)
    settings = Settings(epoch, bn, batch_size, k, iters, tol, samples, runs, steps,
                        params or [], population_batches, seed, device, data_root)
    try:
        run_curvature(run_dir, settings, out)
    except UsageError as e:
        fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
