"""Rendering a comparison as a rich table, plain text, markdown, CSV or JSON.

Human formats show accuracies in percent with mean ± std over seeds; CSV and JSON keep the raw
fractions and full precision for further analysis.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from bnlab.analysis.runs import Run
from bnlab.analysis.summary import Comparison, SettingRow, Stat, setting_of
from bnlab.probes.base import compare_columns
from bnlab.signal.report import SUMMARY as SIGNAL_SUMMARY

# Per metric: column header and whether it is a fraction shown in percent; the run's own, then
# the probes' (their declarations, ``bnlab.probes.base.Column``).
COLUMNS = {
    "final_test_acc": ("final test acc %", True),
    "final_test_acc_precise_bn": ("final test acc % (precise BN)", True),
    "best_test_acc": ("best test acc %", True),
    "gap": ("train-test gap %", True),
    "lr_at_divergence": ("lr at divergence", False),
    **{column.key: (column.header, column.percent) for column in compare_columns()},
}
# A signal comparison's columns (bnlab.signal.report.SUMMARY), none in percent.
SIGNAL_COLUMNS = {key: (header, False) for key, (header, _) in SIGNAL_SUMMARY.items()}
# Columns that only some runs can have (newer probes, Precise BN, divergence); the human
# formats leave them out when no row has a value. CSV and JSON always list every metric.
OPTIONAL = ("final_test_acc_precise_bn", "lr_at_divergence",
            *(column.key for column in compare_columns() if column.optional))
BLANK = "–"
FORMATS = ("table", "csv", "markdown", "json")
STABILITY_NOTE = ("max stable lr: the largest lr at which no seed diverged; best lr: the highest "
                  "mean final test accuracy among lrs at which no seed diverged (among all lrs "
                  "if none).")


@dataclass(frozen=True)
class Grid:
    """One table as text cells, shared by the rich and the markdown renderings."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


def render(comparison: Comparison, fmt: str) -> str:
    """The comparison as the text of a file: `table` gives the table as plain text."""
    if fmt == "table":
        return plain_text(renderable(comparison))
    return {"csv": to_csv, "markdown": to_markdown, "json": to_json}[fmt](comparison)


def renderable(comparison: Comparison) -> RenderableType:
    parts: list[RenderableType] = [Text(line) for line in _preamble(comparison)]
    for grid in grids(comparison):
        table = Table(title=grid.title, title_justify="left", box=box.SIMPLE_HEAD)
        for header in grid.headers:
            table.add_column(header, overflow="fold")
        for row in grid.rows:
            table.add_row(*row)
        parts.append(table)
        if grid.note:
            parts.append(Text(grid.note))
    return Group(*parts)


def print_renderable(thing: RenderableType) -> None:
    """Print to stdout. A terminal gets its own width (cells fold, nothing is lost); a pipe
    gets the width the tables need rather than rich's default 80 columns."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=needed_width(thing))
    console.print(thing)


def plain_text(thing: RenderableType) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=needed_width(thing), color_system=None)
    console.print(thing)
    # Rich pads every line to the table's width; a text file is better off without that.
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def needed_width(thing: RenderableType) -> int:
    probe = Console(width=10_000, file=io.StringIO())
    return max(80, Measurement.get(probe, probe.options, thing).maximum)


def grids(comparison: Comparison) -> list[Grid]:
    found = [_settings_grid(comparison), _stability_grid(comparison)]
    if comparison.unfinished:
        found.append(_unfinished_grid(comparison.unfinished))
    return [grid for grid in found if grid.rows]


def to_markdown(comparison: Comparison) -> str:
    lines = [f"{line}  " for line in _preamble(comparison)]
    for grid in grids(comparison):
        lines += ["", f"### {grid.title}", "", _md_row(grid.headers)]
        lines.append(_md_row(["---"] * len(grid.headers)))
        lines += [_md_row(row) for row in grid.rows]
        if grid.note:
            lines += ["", grid.note]
    return "\n".join(lines) + "\n"


def columns(comparison: Comparison) -> dict[str, tuple[str, bool]]:
    """The metric columns of ``comparison``'s kind of runs: header and whether in percent."""
    return SIGNAL_COLUMNS if comparison.kind == "signal" else COLUMNS


def to_csv(comparison: Comparison) -> str:
    """One row per setting, then one per unfinished run (status tells them apart)."""
    keys, metrics = comparison.keys, columns(comparison)
    divergence = comparison.kind == "train"
    stats = [f"{m}_{part}" for m in metrics for part in ("mean", "std", "n")]
    header = [*keys, "status", "n_seeds", "seeds", *stats,
              *(["n_diverged", "diverged_steps"] if divergence else []), "run_dirs", "note"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in comparison.rows:
        numbers = [getattr(row.stats[m], part) for m in metrics for part in ("mean", "std", "n")]
        diverged = [len(row.diverged_steps), ";".join(map(str, row.diverged_steps))]
        writer.writerow([
            *(row.setting[k] for k in keys), "finished", len(row.runs),
            ";".join(map(str, row.seeds)), *numbers, *(diverged if divergence else []),
            ";".join(_display_path(r.path) for r in row.runs), "",
        ])
    for run in comparison.unfinished:
        setting = ["" if v is None else v for v in setting_of(run, keys).values()]
        writer.writerow([*setting, run.status, "", "", *[""] * len(stats),
                         *(["", ""] if divergence else []), _display_path(run.path),
                         f"{run.describe()}: {run.problem}"])
    return buffer.getvalue()


def to_json(comparison: Comparison) -> str:
    document = {
        "kind": comparison.kind,
        "varying": comparison.keys,
        "fixed": comparison.fixed,
        "settings": [_setting_json(row, columns(comparison)) for row in comparison.rows],
        "lr_stability": [
            {
                "group": s.group,
                "lrs": [row.lr for row in s.rows],
                "max_stable_lr": s.max_stable_lr,
                "best_lr": s.best_lr,
                "best_final_test_acc": _stat_json(s.best_acc) if s.best_acc else None,
            }
            for s in comparison.stability
        ],
        "unfinished": [_unfinished_json(run) for run in comparison.unfinished],
    }
    return json.dumps(document, indent=2, default=str) + "\n"


def _preamble(comparison: Comparison) -> list[str]:
    n_finished = sum(len(row.runs) for row in comparison.rows)
    lines = [f"{n_finished} finished runs in {len(comparison.rows)} settings, "
             f"{len(comparison.unfinished)} not finished or broken."]
    if comparison.fixed:
        fixed = ", ".join(f"{k}={v}" for k, v in comparison.fixed.items())
        lines.append(f"Same in all finished runs: {fixed}")
    return lines


def _settings_grid(comparison: Comparison) -> Grid:
    if comparison.kind == "signal":
        return _signal_grid(comparison)
    keys = comparison.keys or ["setting"]
    shown = [m for m in COLUMNS if m not in OPTIONAL
             or any(row.stats[m].n for row in comparison.rows)]
    # Accuracy columns, then divergence, then what explains it.
    before = [m for m in ("final_test_acc", "final_test_acc_precise_bn", "best_test_acc", "gap")
              if m in shown]
    after = [m for m in shown if m not in before]
    headers = [*keys, "seeds", *(COLUMNS[m][0] for m in before), "diverged",
               *(COLUMNS[m][0] for m in after)]
    rows = []
    for row in comparison.rows:
        setting = [str(row.setting[k]) for k in comparison.keys] or ["all runs"]
        rows.append([*setting, str(len(row.runs)), *(_stat_cell(row, m) for m in before),
                     _diverged_cell(row), *(_stat_cell(row, m) for m in after)])
    return Grid("Results by setting (mean ± std over seeds)", headers, rows)


def _signal_grid(comparison: Comparison) -> Grid:
    """Signal runs: every summary number, pooled over the seeds and batches of a row's runs."""
    shown = [m for m in SIGNAL_COLUMNS if any(row.stats[m].n for row in comparison.rows)]
    headers = [*(comparison.keys or ["setting"]), "runs", *(SIGNAL_COLUMNS[m][0] for m in shown)]
    rows = [[*([str(row.setting[k]) for k in comparison.keys] or ["all runs"]),
             str(len(row.runs)), *(_format(row.stats[m], percent=False) for m in shown)]
            for row in comparison.rows]
    return Grid("Signal at initialization by setting (mean ± std over seeds and batches)",
                headers, rows)


def _stability_grid(comparison: Comparison) -> Grid:
    keys = [k for k in comparison.keys if k != "lr"] or ["setting"]
    headers = [*keys, "lrs tried", "max stable lr", "best lr", "best final test acc %"]
    rows = []
    for s in comparison.stability:
        group = [str(s.group[k]) for k in keys if k in s.group] or ["all runs"]
        acc = _format(s.best_acc, percent=True) if s.best_acc else BLANK
        rows.append([*group, ", ".join(_lr(row.lr) for row in s.rows),
                     _lr(s.max_stable_lr) if s.max_stable_lr is not None else "none",
                     _lr(s.best_lr) if s.best_lr is not None else BLANK, acc])
    return Grid("Learning-rate stability", headers, rows, STABILITY_NOTE)


def _unfinished_grid(runs: list[Run]) -> Grid:
    rows = [[_display_path(run.path), run.status, run.describe() or BLANK, run.problem or ""]
            for run in runs]
    return Grid("Not included: unfinished or broken runs", ["run dir", "status", "setting",
                "details"], rows)


def _stat_cell(row: SettingRow, metric: str) -> str:
    stat = row.stats[metric]
    cell = _format(stat, percent=COLUMNS[metric][1])
    # Say so when some seeds have no value (e.g. diverged before their first evaluation).
    return f"{cell} (n={stat.n})" if 0 < stat.n < len(row.runs) else cell


def _format(stat: Stat, percent: bool) -> str:
    if stat.mean is None:
        return BLANK
    scale, spec = (100.0, ".1f") if percent else (1.0, ".3g")
    text = format(stat.mean * scale, spec)
    return text if stat.std is None else f"{text} ± {format(stat.std * scale, spec)}"


def _diverged_cell(row: SettingRow) -> str:
    steps = row.diverged_steps
    if not steps:
        return f"0/{len(row.runs)}"
    at = ", ".join("?" if s is None else str(s) for s in steps)
    return f"{len(steps)}/{len(row.runs)} @ step {at}"


def _setting_json(row: SettingRow, metrics: dict[str, tuple[str, bool]]) -> dict[str, Any]:
    return {
        "setting": row.setting,
        "n_seeds": len(row.runs),
        "seeds": row.seeds,
        "metrics": {m: _stat_json(row.stats[m]) for m in metrics},
        "n_diverged": len(row.diverged_steps),
        "diverged_steps": row.diverged_steps,
        "run_dirs": [str(run.path) for run in row.runs],
    }


def _unfinished_json(run: Run) -> dict[str, Any]:
    return {"run_dir": str(run.path), "status": run.status, "setting": run.describe(),
            "details": run.problem}


def _stat_json(stat: Stat) -> dict[str, Any]:
    return {"mean": stat.mean, "std": stat.std, "n": stat.n}


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _lr(value: float | None) -> str:
    return format(value, "g") if value is not None else BLANK


def _display_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative
