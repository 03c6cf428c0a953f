"""The ``bnlab`` command: ``train`` (Hydra), ``compare`` and ``plot``.

``bnlab train`` hands its arguments to Hydra untouched. User mistakes — a bad override, an
unknown config option, missing data, a path that is not a run dir — end in one ``error: ...``
line and exit code 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import hydra
import typer
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from bnlab.errors import UsageError
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

app = typer.Typer(
    help="bnlab: study internal covariate shift and batch normalization on CIFAR-10.\n\n"
    "train runs experiments (Hydra overrides, sweeps with -m), compare summarizes sweeps, "
    "plot draws activation-distribution, gradient, drift and ICS figures.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

# Errors the user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, HydraException, OmegaConfBaseException)
ONE_LINE_ERRORS = "BNLAB_ONE_LINE_ERRORS"  # set by `train` unless HYDRA_FULL_ERROR=1 was asked for
log = logging.getLogger(__name__)


def one_line(error: BaseException) -> str:
    """Hydra's messages span lines (available options, search path); fold them into one."""
    text = str(error).split("\nConfig search path", 1)[0]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text += f" ({str(cause).splitlines()[0]})"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts).replace(":;", ":")


class RunDirGuard(Callback):
    """Checks before Hydra creates a single run's dir: the config is valid, the data is there,
    and the dir is writable, not in use by another bnlab process, and holds no run (unless
    ``resume`` or ``overwrite`` is set), so a mistake leaves no stray run dir and never
    clobbers an existing run's ``.hydra/`` files. The run dir's lock, taken here, is held until
    the run ends, so a second launch into the same dir cannot rewrite ``.hydra/`` meanwhile."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        from bnlab.rundir import HELD_LOCK, check_run_dir

        run_dir = Path(config.hydra.run.dir)
        try:  # the checks that need no run dir come first, so a mistake leaves none behind
            _check_job(config)
            _check_writable(run_dir)
            HELD_LOCK.take(run_dir)  # released when the run ends
            check_run_dir(run_dir, config.resume, config.overwrite)
        except UsageError as e:
            HELD_LOCK.release()
            _fail(e)  # Hydra turns a callback's exceptions into warnings; SystemExit stops it

    def on_run_end(self, config: DictConfig, **kwargs: object) -> None:
        from bnlab.rundir import HELD_LOCK

        HELD_LOCK.release()

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        sweep = config.hydra.sweep.dir
        typer.echo(f"sweep done: {sweep}\n  compare: bnlab compare {sweep}   |   "
                   f"tensorboard --logdir {sweep}")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        try:
            _check_sweep_jobs(config)
            _check_writable(Path(config.hydra.sweep.dir))
        except USER_ERRORS as e:
            _fail(e)




def _check_job(config: DictConfig, here: bool = True) -> None:
    """What one job can be checked for before it starts: valid values and, when it will run
    on this machine (``here``), that its device and data exist."""
    from bnlab.config import validate
    from bnlab.data import locate
    from bnlab.runtime import pick_device

    validate(config)
    if here:
        pick_device(config.device)
        locate(config.data)


BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"
# Jobs of these launchers run on other machines (cluster nodes), with their own devices and
# file systems: only the values are checked up front there.
REMOTE_LAUNCHERS = ("SlurmLauncher",)


def _check_sweep_jobs(config: DictConfig) -> None:
    """Check every job of a sweep before the first one starts. Otherwise a bad value in job 17
    stops the sweep after 16 jobs' work, and under a parallel launcher it also kills the jobs
    running beside it. The jobs are expanded and composed as Hydra's basic sweeper will do it
    (its ``params`` first, then the command line, interpolations left for each job to resolve)
    and checked with the job's Hydra config in place, as the launcher will run them; other
    sweepers choose jobs as they go."""
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return
    loader = GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides([*params, *task])
    (jobs,) = BasicSweeper.split_arguments(overrides, None)  # one batch: every job
    if not jobs:
        return
    if len(jobs) > 20:
        log.info(f"Checking the configs of {len(jobs)} jobs before starting")
    here = not str(config.hydra.launcher.get("_target_", "")).endswith(REMOTE_LAUNCHERS)
    # Jobs are named by the values that vary across the sweep (all overrides for one job).
    varying = [i for i in range(len(jobs[0])) if len({job[i] for job in jobs}) > 1]
    hydra_config = HydraConfig.instance()
    previous = hydra_config.cfg
    try:
        for num, job in enumerate(jobs):
            job_cfg = loader.load_sweep_config(config, list(job))
            with open_dict(job_cfg):
                job_cfg.hydra.job.id, job_cfg.hydra.job.num = num, num
            hydra_config.set_config(job_cfg)  # for ${hydra:...} in the job's values
            try:
                _check_job(job_cfg, here)
                _check_job_dir_name(str(job_cfg.hydra.sweep.subdir))
            except USER_ERRORS as e:
                name = " ".join(job[i] for i in varying) if varying else " ".join(job)
                full = os.environ.get(ONE_LINE_ERRORS) == "0"  # keep the cause for the traceback
                raise UsageError(f"sweep job {name}: {one_line(e)}; no job was started") from (
                    e if full else None)
    finally:
        hydra_config.cfg = previous


NAME_MAX = 255  # bytes of one path component on Linux and macOS file systems


def _check_job_dir_name(subdir: str) -> None:
    """A job dir named from many overrides can exceed the file system's name limit, which would
    fail only when Hydra creates it, mid-sweep."""
    for part in Path(subdir).parts:
        if len(part.encode()) > NAME_MAX:
            raise UsageError(f"the job dir name {part[:40]!r}... is {len(part.encode())} bytes, "
                             f"over the file system's {NAME_MAX}; name job dirs with fewer "
                             "keys, e.g. hydra.sweep.subdir='norm=${norm.name},seed=${seed}'")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror}; choose another "
                         "hydra.run.dir / hydra.sweep.dir") from None


def _default_threads() -> int | None:
    """Under a parallel launcher, give each job its share of the cores so jobs do not fight."""
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "Joblib" in str(launcher.get("_target_", "")) else None
    if not n_jobs or n_jobs < 1:
        return None
    return max(1, (os.cpu_count() or 1) // n_jobs)


@hydra.main(config_path="pkg://bnlab.configs", config_name="train", version_base="1.3")
def _train_job(cfg: DictConfig) -> dict:
    from bnlab import train
    from bnlab.rundir import HELD_LOCK
    from bnlab.runtime import setup_process

    if cfg.threads is None:
        cfg.threads = _default_threads()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        setup_process(cfg)
        return train.run(cfg, run_dir, locked=HELD_LOCK.holds(run_dir))
    except UsageError as e:
        # Leave the job as SystemExit: Hydra would add its own "Error executing job" line.
        _fail(e)
    finally:
        _print_summary(run_dir)


def _print_summary(run_dir: Path) -> None:
    """The end of a run, however it ended: status, accuracy, time, and where to look."""
    from bnlab.rundir import read_metrics

    m = read_metrics(run_dir)
    if m is None or m.get("status") == "running":
        return
    status, acc, best = m["status"], m.get("final_test_acc"), m.get("best_test_acc")
    if m.get("diverged"):
        lr = m.get("lr_at_divergence")
        result = f"diverged at step {m['diverged_step']}" + (f" (lr {lr:.3g})" if lr else "")
    elif acc is not None:
        result = f"test acc {acc:.4f} (best {best:.4f})"
    else:
        result = f"{m.get('steps', 0)} steps"
    typer.echo(f"{status}: {result}, {m.get('wall_time_s', 0):.1f} s, run dir {run_dir}")
    if status == "interrupted":
        typer.echo(f"  continue: bnlab train resume={run_dir}")
    typer.echo(f"  look at it: tensorboard --logdir {run_dir}   |   "
               f"bnlab plot {run_dir} --out {run_dir / 'activations.png'}")


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


def _fail(error: BaseException) -> None:
    if os.environ.get(ONE_LINE_ERRORS) == "0":  # HYDRA_FULL_ERROR=1: the whole story
        traceback.print_exception(error)
    typer.echo(f"error: {one_line(error)}", err=True)
    # SystemExit, not typer.Exit: inside a Hydra job an Exception would get Hydra's own report.
    raise SystemExit(2)


@app.command(help=TRAIN_HELP, context_settings={"allow_extra_args": True,
                                                "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints errors itself unless HYDRA_FULL_ERROR is set; set it so they reach us and
    # become one line (or, if the user asked for it, a traceback).
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", ONE_LINE_ERRORS)}
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[ONE_LINE_ERRORS] = "0" if full_error else "1"
    argv = sys.argv
    try:
        sys.argv = ["bnlab train", *_resume_args(list(ctx.args))]  # where hydra.main reads them
        _train_job()
    except USER_ERRORS as e:
        if full_error:
            raise
        _fail(e)
    finally:
        from bnlab.rundir import HELD_LOCK

        HELD_LOCK.release()
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
        _fail(e)


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
) -> None:
    """Figures of a run's activation percentiles (Ioffe & Szegedy Fig. 1), gradient norms,
    drift, ICS and histogram snapshots, runs side by side."""
    from bnlab.analysis.plot import run_plot

    if out is None and not list_only:
        _fail(UsageError("--out FILE.png (or .svg) is required unless --list is given"))
    try:
        run_plot(run_dirs, out, layers=layer, steps=step, list_only=list_only)
    except UsageError as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
