"""The commands that are Hydra apps (``bnlab train``, and analyses such as ``bnlab signal``): one
machinery for composing ``configs/<name>.yaml`` with the user's overrides, ``-m`` sweeps,
checking every value before any run dir is written, guarding run dirs, and one-line errors.

A command is a :class:`Command` (what its job checks, runs and prints, as import paths, so that
``bnlab --help`` imports no torch) plus a ``hydra.main`` entry function below: Hydra's launchers
pickle the task function, so each command's entry is a module-level function.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import typer
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from bnlab.errors import UsageError

log = logging.getLogger(__name__)

# Errors the user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, HydraException, OmegaConfBaseException)
ONE_LINE_ERRORS = "BNLAB_ONE_LINE_ERRORS"  # "0": HYDRA_FULL_ERROR=1 was asked for


@dataclass(frozen=True)
class Command:
    """What one Hydra command's job does, each part an import path ``module:function``.

    - ``validate(cfg)``: check every value of a composed config (``UsageError`` on the first
      bad one), before any run dir is written;
    - ``check_run_dir(cfg, run_dir)``: refuse a run dir that holds a run this job must not
      clobber (``UsageError``);
    - ``run(cfg, run_dir, locked)``: the job (``locked``: the caller holds the run dir's lock);
    - ``summary(run_dir)``: the lines printed when the job ends, however it ended;
    - ``sweep_summary(sweep_dir)``: the lines printed when a sweep (``-m``) ends.
    """

    validate: str
    check_run_dir: str
    run: str
    summary: str
    sweep_summary: str

    def call(self, part: str, *args: Any) -> Any:
        module, _, name = getattr(self, part).partition(":")
        function: Callable[..., Any] = getattr(importlib.import_module(module), name)
        return function(*args)


COMMANDS = {
    "train": Command(validate="bnlab.config:validate", check_run_dir="bnlab.rundir:check_train_dir",
                     run="bnlab.train:run", summary="bnlab.rundir:train_summary",
                     sweep_summary="bnlab.rundir:train_sweep_summary"),
    "signal": Command(validate="bnlab.signal.command:validate",
                      check_run_dir="bnlab.signal.command:check_signal_dir",
                      run="bnlab.signal.command:run",
                      summary="bnlab.signal.command:signal_summary",
                      sweep_summary="bnlab.signal.command:signal_sweep_summary"),
}


def one_line(error: BaseException) -> str:
    """Hydra's messages span lines (available options, search path); fold them into one."""
    text = str(error).split("\nConfig search path", 1)[0]
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text += f" ({str(cause).splitlines()[0]})"
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    return "; ".join(parts).replace(":;", ":")


def fail(error: BaseException) -> NoReturn:
    """Print ``error: <one line>`` (or the traceback under HYDRA_FULL_ERROR=1) and exit 2."""
    if os.environ.get(ONE_LINE_ERRORS) == "0":
        traceback.print_exception(error)
    typer.echo(f"error: {one_line(error)}", err=True)
    # SystemExit, not typer.Exit: inside a Hydra job an Exception would get Hydra's own report.
    raise SystemExit(2)


class RunDirGuard(Callback):
    """Checks before Hydra creates a single run's dir: the config is valid, the data is there,
    and the dir is writable, not in use by another bnlab process, and holds no run the job must
    not clobber, so a mistake leaves no stray run dir and never rewrites an existing run's
    ``.hydra/`` files. The run dir's lock, taken here, is held until the run ends, so a second
    launch into the same dir cannot rewrite ``.hydra/`` meanwhile."""

    def __init__(self, command: str = "train") -> None:
        self.command = COMMANDS[command]

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        """In a data-parallel job every rank checks the config, rank 0 alone the run dir (and
        holds its lock), and all fail alike; every rank takes rank 0's run dir (each resolves
        ``${now:...}`` on its own). ``dist.nproc`` > 1 in a single process hands over to
        torch's elastic launcher, whose processes then run this job."""
        from bnlab import distributed
        from bnlab.rundir import HELD_LOCK, run_dir_lock

        world = distributed.start()
        run_dir = Path(distributed.broadcast(world, str(config.hydra.run.dir)))
        error = None
        try:  # the checks that need no run dir come first, so a mistake leaves none behind
            check_job(self.command, config)
            nproc = OmegaConf.select(config, "dist.nproc", default=1)
            if world.size == 1 and nproc > 1:  # checked here, run by the launched processes
                check_writable(run_dir)
                self.command.call("check_run_dir", config, run_dir)
                with run_dir_lock(run_dir):  # not in use by another run either
                    pass
                raise SystemExit(distributed.hand_over(nproc, _with_run_dir(sys.argv[1:],
                                                                             run_dir)))
            if world.main:
                check_writable(run_dir)
                HELD_LOCK.take(run_dir)  # released when the run ends
                self.command.call("check_run_dir", config, run_dir)
        except UsageError as e:
            error = e
        try:
            distributed.agree(world, error)
        except UsageError as e:
            HELD_LOCK.release()
            fail(e)  # Hydra turns a callback's exceptions into warnings; SystemExit stops it
        with read_write(config.hydra.run):
            config.hydra.run.dir = str(run_dir)

    def on_run_end(self, config: DictConfig, **kwargs: object) -> None:
        from bnlab.rundir import HELD_LOCK

        HELD_LOCK.release()

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        from bnlab import distributed

        world = distributed.start()  # (a sweep under torchrun: every rank runs every job)
        sweep_dir = distributed.broadcast(world, str(config.hydra.sweep.dir))
        error = None
        try:
            check_sweep_jobs(self.command, config)
            if world.main:
                check_writable(Path(sweep_dir))
        except USER_ERRORS as e:  # (one line to share with the other ranks)
            error = e if world.size == 1 or isinstance(e, UsageError) else UsageError(
                one_line(e))
        try:
            distributed.agree(world, error)  # type: ignore[arg-type]
        except UsageError as e:
            fail(e)
        with read_write(config.hydra.sweep):
            config.hydra.sweep.dir = sweep_dir

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        for line in self.command.call("sweep_summary", Path(config.hydra.sweep.dir)):
            typer.echo(line)


def check_job(command: Command, config: DictConfig, here: bool = True) -> None:
    """What one job can be checked for before it starts: valid values and, when it will run
    on this machine (``here``), that its device and data exist."""
    from bnlab.data import locate
    from bnlab.runtime import pick_device

    command.call("validate", config)
    if here:
        pick_device(config.device)
        locate(config.data)


BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"
# Jobs of these launchers run on other machines (cluster nodes), with their own devices and
# file systems: only the values are checked up front there.
REMOTE_LAUNCHERS = ("SlurmLauncher",)


def check_sweep_jobs(command: Command, config: DictConfig) -> None:
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
                check_job(command, job_cfg, here)
                check_job_dir_name(str(job_cfg.hydra.sweep.subdir))
            except USER_ERRORS as e:
                name = " ".join(job[i] for i in varying) if varying else " ".join(job)
                full = os.environ.get(ONE_LINE_ERRORS) == "0"  # keep the cause for the traceback
                raise UsageError(f"sweep job {name}: {one_line(e)}; no job was started") from (
                    e if full else None)
    finally:
        hydra_config.cfg = previous


NAME_MAX = 255  # bytes of one path component on Linux and macOS file systems


def check_job_dir_name(subdir: str) -> None:
    """A job dir named from many overrides can exceed the file system's name limit, which would
    fail only when Hydra creates it, mid-sweep."""
    for part in Path(subdir).parts:
        if len(part.encode()) > NAME_MAX:
            raise UsageError(f"the job dir name {part[:40]!r}... is {len(part.encode())} bytes, "
                             f"over the file system's {NAME_MAX}; name job dirs with fewer "
                             "keys, e.g. hydra.sweep.subdir='norm=${norm.name},seed=${seed}'")


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror}; choose another "
                         "hydra.run.dir / hydra.sweep.dir") from None


def _default_threads(world_local_size: int) -> int | None:
    """Under a parallel launcher, or with several processes of a data-parallel job on this
    machine, give each its share of the cores so they do not fight."""
    launcher = HydraConfig.get().launcher
    n_jobs = launcher.get("n_jobs") if "Joblib" in str(launcher.get("_target_", "")) else None
    if not n_jobs or n_jobs < 1:
        n_jobs = world_local_size
    return max(1, (os.cpu_count() or 1) // n_jobs) if n_jobs > 1 else None


def _with_run_dir(args: list[str], run_dir: Path) -> list[str]:
    """``args`` with ``hydra.run.dir`` set to ``run_dir`` (for the launched processes)."""
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [a for a in args if not a.startswith("hydra.run.dir=")] + [
        f"hydra.run.dir='{quoted}'"]


def _job(name: str, cfg: DictConfig) -> dict | None:
    """One job of command ``name``: process setup, the run, the closing summary. A sweep's job
    with ``dist.nproc`` > 1 hands over to torch's elastic launcher (in its job dir)."""
    from bnlab import distributed
    from bnlab.rundir import HELD_LOCK, read_metrics
    from bnlab.runtime import setup_process

    command = COMMANDS[name]
    world = distributed.start()
    if not world.main:
        distributed.quiet_logging()
    if cfg.threads is None:
        cfg.threads = _default_threads(world.local_size)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    nproc = OmegaConf.select(cfg, "dist.nproc", default=1)
    if world.size == 1 and nproc > 1:
        task = list(HydraConfig.get().overrides.task)
        code = distributed.hand_over(nproc, _with_run_dir(task, run_dir))
        if code:
            raise SystemExit(code)
        return read_metrics(run_dir)
    try:
        setup_process(cfg)
        return command.call("run", cfg, run_dir, HELD_LOCK.holds(run_dir))
    except UsageError as e:
        # Leave the job as SystemExit: Hydra would add its own "Error executing job" line.
        fail(e)
    finally:
        if world.main:
            for line in command.call("summary", run_dir):
                typer.echo(line)


@hydra.main(config_path="pkg://bnlab.configs", config_name="train", version_base="1.3")
def _train_job(cfg: DictConfig) -> dict | None:
    return _job("train", cfg)


@hydra.main(config_path="pkg://bnlab.configs", config_name="signal", version_base="1.3")
def _signal_job(cfg: DictConfig) -> dict:
    return _job("signal", cfg)


ENTRIES = {"train": _train_job, "signal": _signal_job}


def run_command(name: str, args: list[str]) -> None:
    """Run Hydra command ``name`` with ``args`` (Hydra overrides and flags, passed on as is)."""
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints errors itself unless HYDRA_FULL_ERROR is set; set it so they reach us and
    # become one line (or, if the user asked for it, a traceback).
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", ONE_LINE_ERRORS)}
    os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[ONE_LINE_ERRORS] = "0" if full_error else "1"
    argv = sys.argv
    launched = os.environ.get("WORLD_SIZE", "1") != "1"  # a rank of torchrun's job
    if launched:
        from bnlab import distributed

        args = [*args, *distributed.rank_overrides(distributed.env_world())]
    try:
        sys.argv = [f"bnlab {name}", *args]  # where hydra.main reads them
        ENTRIES[name]()
    except USER_ERRORS as e:
        if full_error:
            raise
        fail(e)
    finally:
        from bnlab.rundir import HELD_LOCK

        HELD_LOCK.release()
        if launched:
            distributed.finish()
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
