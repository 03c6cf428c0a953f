"""`bnlab compare`: read sweep and run dirs, write the comparison table and the lr figure."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from bnlab.analysis.events import read_events
from bnlab.analysis.lr_figure import lr_figure
from bnlab.analysis.output import check_writable, figure_bytes, figure_type, write_atomic
from bnlab.analysis.runs import Run, find_run_dirs, load_run
from bnlab.analysis.signal_figure import signal_figure
from bnlab.analysis.summary import Comparison, compare_runs, run_numbers, signal_numbers
from bnlab.analysis.tables import FORMATS, print_renderable, render, renderable
from bnlab.errors import UsageError

DEFAULT_FIGURE = {"train": "compare_lr.png", "signal": "compare_signal.png"}


def run_compare(
    paths: list[Path], fmt: str = "table", out: Path | None = None, figure: Path | None = None
) -> None:
    """Compare the runs under `paths` (run dirs, sweep dirs or their parents).

    The table goes to `out` (written atomically) or to stdout; the accuracy-vs-lr figure to
    `figure`, by default next to the table. Notes on what was written go to stderr, so that
    stdout stays a clean CSV/JSON/markdown document. Runs of `bnlab signal` are compared among
    themselves, never mixed with training runs: their own columns, and instead of the lr figure
    their numbers against the numeric setting that varies (`signal_figure`).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    runs = [load_run(d) for d in find_run_dirs(paths)]
    run_type = run_kind(runs)
    figure = figure or _default_figure(paths[0], out, run_type)
    kind = _check_outputs(out, figure)
    comparison = compare_runs(*_with_numbers(runs), run_type)
    _write_table(comparison, fmt, out)
    if run_type == "signal":
        fig, missing = signal_figure(comparison), "No numeric setting varies: no signal figure."
    else:
        fig = lr_figure(comparison)
        missing = "No run recorded a positive learning rate: no lr figure written."
    if fig is None:
        print(missing, file=sys.stderr)
    else:
        write_atomic(figure, figure_bytes(fig, kind))
        print(f"Wrote {'signal' if run_type == 'signal' else 'lr'} figure: {figure}",
              file=sys.stderr)


def _default_figure(first: Path, out: Path | None, run_type: str) -> Path:
    name = DEFAULT_FIGURE[run_type]
    if out is not None:
        return out.with_name(f"{out.stem}_{name.removeprefix('compare_')}")
    return first / name


def _check_outputs(out: Path | None, figure: Path) -> str:
    """Everything that could stop the writes is checked before anything is read or written."""
    kind = figure_type(figure, "--figure")
    check_writable(figure, "--figure")
    if out is not None:
        check_writable(out, "--out")
        if out.resolve() == figure.resolve():
            raise UsageError(f"--out and --figure are the same file: {out}")
    return kind


def run_kind(runs: list[Run]) -> str:
    """``train`` or ``signal``: what the runs are; a mix is a usage error (their numbers are
    different things)."""
    kinds = {run.kind for run in runs}
    if len(kinds) > 1:
        signal = next(run.path for run in runs if run.kind == "signal")
        train = next(run.path for run in runs if run.kind == "train")
        raise UsageError(f"the paths hold both bnlab signal runs (e.g. {signal}) and training "
                         f"runs (e.g. {train}); compare each kind on its own")
    return kinds.pop() if kinds else "train"


def _read_runs(run_dirs: list[Path]) -> tuple[list[Run], dict[Path, dict]]:
    """Load every run and its numbers (``_with_numbers``)."""
    return _with_numbers([load_run(d) for d in run_dirs])


def _with_numbers(loaded: list[Run]) -> tuple[list[Run], dict[Path, dict]]:
    """The runs and their numbers by path: a finished training run's events give its gradient,
    drift, ICS, whiteness and statistics-mismatch numbers; a signal run's are its summary."""
    runs, numbers = [], {}
    for run in loaded:
        if run.finished and run.kind == "signal":
            numbers[run.path] = signal_numbers(run)
        elif run.finished:
            try:
                events = read_events(run.path, histograms=False)
            except UsageError as err:
                # One bad file must not hide a whole sweep: the run is listed as broken.
                run = dataclasses.replace(run, status="broken", problem=str(err))
            else:
                numbers[run.path] = run_numbers(run, events)
        runs.append(run)
    return runs, numbers


def _write_table(comparison: Comparison, fmt: str, out: Path | None) -> None:
    if out is not None:
        write_atomic(out, render(comparison, fmt))
        print(f"Wrote {fmt} table: {out}", file=sys.stderr)
    elif fmt == "table":
        print_renderable(renderable(comparison))
    else:
        sys.stdout.write(render(comparison, fmt))
