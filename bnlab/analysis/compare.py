"""`bnlab compare`: read sweep and run dirs, write the comparison table and the lr figure."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from bnlab.analysis.events import read_events
from bnlab.analysis.lr_figure import lr_figure
from bnlab.analysis.output import check_writable, figure_bytes, figure_type, write_atomic
from bnlab.analysis.runs import Run, find_run_dirs, load_run
from bnlab.analysis.summary import Comparison, compare_runs, run_numbers, signal_numbers
from bnlab.analysis.tables import FORMATS, print_renderable, render, renderable
from bnlab.errors import UsageError

DEFAULT_FIGURE = "compare_lr.png"


def run_compare(
    paths: list[Path], fmt: str = "table", out: Path | None = None, figure: Path | None = None
) -> None:
    """Compare the runs under `paths` (run dirs, sweep dirs or their parents).

    The table goes to `out` (written atomically) or to stdout; the accuracy-vs-lr figure to
    `figure`, by default next to the table. Notes on what was written go to stderr, so that
    stdout stays a clean CSV/JSON/markdown document. Runs of `bnlab signal` are compared among
    themselves (their own columns, no lr figure), never mixed with training runs.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; use one of: {', '.join(FORMATS)}")
    run_dirs = find_run_dirs(paths)
    figure = figure or _default_figure(paths[0], out)
    kind = _check_outputs(out, figure)
    runs, numbers = _read_runs(run_dirs)
    comparison = compare_runs(runs, numbers, run_kind(runs))
    _write_table(comparison, fmt, out)
    if comparison.kind == "signal":
        print("Signal runs: no lr figure; overlay them with bnlab plot RUN_DIR ... --out FILE",
              file=sys.stderr)
        return
    fig = lr_figure(comparison)
    if fig is None:
        print("No run recorded a positive learning rate: no lr figure written.", file=sys.stderr)
    else:
        write_atomic(figure, figure_bytes(fig, kind))
        print(f"Wrote lr figure: {figure}", file=sys.stderr)


def _default_figure(first: Path, out: Path | None) -> Path:
    if out is not None:
        return out.with_name(f"{out.stem}_lr.png")
    return first / DEFAULT_FIGURE


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
    """Load every run; a finished training run's events add its gradient, drift, ICS,
    whiteness and statistics-mismatch numbers, a signal run's numbers are its summary."""
    runs, numbers = [], {}
    for run in map(load_run, run_dirs):
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
