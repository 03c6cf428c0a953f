"""Turning runs into a comparison: one row per setting with seeds aggregated, and the
learning-rate stability of each norm.

A setting is every config value that differs between the runs, seed excepted. The run's summary
config in metrics.json names the usual ones (norm, lr, dropout, ...); an override outside it
(`norm.momentum=0.01`) becomes a setting key only where it tells apart runs that the summary
config would lump together, so aliases such as `optim.lr` next to `lr` add no column.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.analysis.events import Events
from bnlab.analysis.runs import Run
from bnlab.probes.base import Column, compare_columns
from bnlab.signal.report import SUMMARY as SIGNAL_SUMMARY

# Display order of the summary-config keys; others follow in the order the runs name them.
KEY_ORDER = ("norm", "norm_slots", "norm_rest", "model", "lr", "dropout", "batch_size",
             "optimizer", "momentum", "weight_decay", "sched", "epochs", "data")
# The per-run numbers that rows aggregate over seeds: the run's own (metrics.json), then the
# probes' columns (from the event files).
RUN_METRICS = ("final_test_acc", "final_test_acc_precise_bn", "best_test_acc", "gap",
               "lr_at_divergence")
METRICS = (*RUN_METRICS, *(column.key for column in compare_columns()))
# A signal run's numbers: its signal.json summary (bnlab.signal.report.SUMMARY).
SIGNAL_METRICS = tuple(SIGNAL_SUMMARY)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over the seeds that have a finite value."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return cls(None, None, 0)
        std = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(statistics.fmean(finite), std, len(finite))

    @classmethod
    def pooled(cls, stats: Iterable[Stat]) -> Stat:
        """The mean and sample std of all the measurements behind ``stats`` taken together
        (each a mean, std and count of its own, as a signal run reports them)."""
        parts = [s for s in stats if s.n and s.mean is not None]
        n = sum(s.n for s in parts)
        if not n:
            return cls(None, None, 0)
        mean = math.fsum(s.n * s.mean for s in parts) / n
        if n < 2:
            return cls(mean, None, n)
        within = math.fsum((s.n - 1) * (s.std or 0.0) ** 2 for s in parts)
        between = math.fsum(s.n * (s.mean - mean) ** 2 for s in parts)
        return cls(mean, math.sqrt((within + between) / (n - 1)), n)


@dataclass(frozen=True)
class SettingRow:
    setting: dict[str, Any]
    runs: tuple[Run, ...]
    stats: dict[str, Stat]

    @property
    def seeds(self) -> list[Any]:
        return [run.config.get("seed", run.overrides.get("seed")) for run in self.runs]

    @property
    def diverged_steps(self) -> list[int | None]:
        return [run.metric("diverged_step") for run in self.runs if run.diverged]

    @property
    def lr(self) -> float | None:
        return _number(self.runs[0].config.get("lr"))


@dataclass(frozen=True)
class Stability:
    """How far the learning rate could go for one norm (and any other varying key)."""

    group: dict[str, Any]
    rows: tuple[SettingRow, ...]  # ascending learning rate
    max_stable_lr: float | None  # largest lr at which no seed diverged
    best_lr: float | None  # lr of the best mean final test accuracy, stable lrs first
    best_acc: Stat | None

    @property
    def label(self) -> str:
        return " ".join(map(str, self.group.values())) or "all runs"


@dataclass(frozen=True)
class Comparison:
    keys: list[str]
    fixed: dict[str, Any]
    rows: list[SettingRow]
    stability: list[Stability]
    unfinished: list[Run]
    kind: str = "train"  # the runs' kind: "train" or "signal" (bnlab.analysis.runs)


def run_numbers(run: Run, events: Events) -> dict[str, float | None]:
    """The numbers one run contributes to its row; None where not logged: accuracies and
    ``lr_at_divergence`` as metrics.json has them, then each probe's columns (``Column``: e.g.
    ``white_offdiag``, the deepest watched layer's mean |off-diagonal correlation| at the last
    probe)."""
    final, train = _number(run.metric("final_test_acc")), _number(run.metric("final_train_acc"))
    numbers = {
        "final_test_acc": final,
        "final_test_acc_precise_bn": _number(run.metric("final_test_acc_precise_bn")),
        "best_test_acc": _number(run.metric("best_test_acc")),
        "gap": train - final if train is not None and final is not None else None,
        "lr_at_divergence": _number(run.metric("lr_at_divergence")),
    }
    return numbers | {column.key: column_number(events, column) for column in compare_columns()}


def column_number(events: Events, column: Column) -> float | None:
    """A probe column's number of one run: each of its tags reduced over steps, then over
    modules (the tags in the order the run first logged them, the deepest last)."""
    if column.tags.endswith("/"):
        tags = events.tags(column.tags)
    else:
        tags = [column.tags] if column.tags in events.scalars else []
    per_tag = [_over_steps(events.scalars[tag].values, column.steps) for tag in tags]
    if column.modules == "deepest":
        return per_tag[-1] if per_tag else None
    return _mean_of(per_tag)


def _over_steps(values: np.ndarray, how: str) -> float | None:
    if how == "last":  # a diverged run's last probe is NaN: its final state is no number
        return _number(float(values[-1])) if values.size else None
    finite = values[np.isfinite(values)]  # non-finite norms mark divergence, reported apart
    if not finite.size:
        return None
    return float(finite.mean() if how == "mean" else finite.max())


def signal_numbers(run: Run) -> dict[str, Stat]:
    """A signal run's numbers: the summary stats of its signal.json (each over its seeds and
    batches); a missing or malformed entry is an empty stat."""
    summary = (run.metrics or {}).get("summary")
    numbers = {}
    for key in SIGNAL_METRICS:
        entry = summary.get(key) if isinstance(summary, dict) else None
        entry = entry if isinstance(entry, dict) else {}
        n = entry.get("n")
        numbers[key] = Stat(_number(entry.get("mean")), _number(entry.get("std")),
                            n if isinstance(n, int) and not isinstance(n, bool) else 0)
    return numbers


def compare_runs(runs: list[Run], numbers: dict[Path, dict[str, Any]],
                 kind: str = "train") -> Comparison:
    """Group finished runs into settings; list the others apart. `numbers` by run path: floats
    (a training run's) or stats (a signal run's, pooled over a row's runs)."""
    finished = [run for run in runs if run.finished]
    keys, fixed = setting_keys(finished)
    groups: dict[str, list[Run]] = {}
    for run in finished:
        groups.setdefault(_hashable(setting_of(run, keys)), []).append(run)
    metrics = SIGNAL_METRICS if kind == "signal" else METRICS
    rows = [_row(setting_of(g[0], keys), g, numbers, metrics) for g in groups.values()]
    rows.sort(key=lambda row: [_sort_value(row.setting[k]) for k in keys])
    return Comparison(
        keys=keys,
        fixed=fixed,
        rows=rows,
        stability=_stability(rows) if kind == "train" else [],
        unfinished=sorted((run for run in runs if not run.finished), key=lambda r: r.path),
        kind=kind,
    )


def setting_keys(runs: list[Run]) -> tuple[list[str], dict[str, Any]]:
    """The keys whose values differ between runs (seed aside), and the values all share."""
    base = _ordered_keys(key for run in runs for key in run.config if key != "seed")
    values = {key: {_hashable(run.config.get(key)) for run in runs} for key in base}
    keys = [key for key in base if len(values[key]) > 1]
    fixed = {key: runs[0].config.get(key) for key in base if len(values[key]) == 1}
    mechanics = set().union(*(run.mechanics_keys for run in runs)) if runs else set()
    overridden = dict.fromkeys(k for run in runs for k in sorted(run.overrides))
    for key in (k for k in overridden if k not in mechanics):
        if _splits(runs, keys, key):
            keys.append(key)
    return keys, fixed


def setting_of(run: Run, keys: list[str]) -> dict[str, Any]:
    return {key: run.config[key] if key in run.config else run.lookup(key) for key in keys}


def _splits(runs: list[Run], keys: list[str], key: str) -> bool:
    """Whether `key` takes different values among runs that agree on all of `keys`."""
    seen: dict[str, str] = {}
    for run in runs:
        group, value = _hashable(setting_of(run, keys)), _hashable(run.lookup(key))
        if seen.setdefault(group, value) != value:
            return True
    return False


def _row(setting: dict[str, Any], runs: list[Run], numbers: dict[Path, dict],
         metrics: tuple[str, ...]) -> SettingRow:
    runs = sorted(runs, key=lambda r: _sort_value(r.config.get("seed")))
    stats = {m: _aggregate([numbers.get(run.path, {}).get(m) for run in runs]) for m in metrics}
    return SettingRow(setting, tuple(runs), stats)


def _aggregate(values: list[Any]) -> Stat:
    if any(isinstance(v, Stat) for v in values):
        return Stat.pooled(v for v in values if isinstance(v, Stat))
    return Stat.of(values)


def _stability(rows: list[SettingRow]) -> list[Stability]:
    by_group: dict[str, list[SettingRow]] = {}
    for row in rows:
        if row.lr is not None:
            group = {k: v for k, v in row.setting.items() if k != "lr"}
            by_group.setdefault(_hashable(group), []).append(row)
    return [_group_stability(group_rows) for group_rows in by_group.values()]


def _group_stability(rows: list[SettingRow]) -> Stability:
    rows = sorted(rows, key=lambda row: row.lr)
    stable = [row for row in rows if not row.diverged_steps]
    # The best lr is sought among stable ones: a mean over the one seed that survived would
    # crown an lr at which training mostly blew up. Only if none is stable are all considered.
    scored = [row for row in stable or rows if row.stats["final_test_acc"].mean is not None]
    # max() keeps the first of equal means, i.e. the smaller learning rate.
    best = max(scored, key=lambda row: row.stats["final_test_acc"].mean, default=None)
    return Stability(
        group={k: v for k, v in rows[0].setting.items() if k != "lr"},
        rows=tuple(rows),
        max_stable_lr=max((row.lr for row in stable), default=None),
        best_lr=best.lr if best else None,
        best_acc=best.stats["final_test_acc"] if best else None,
    )


def _mean_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def _ordered_keys(keys: Iterable[str]) -> list[str]:
    def rank(key: str) -> int:
        return KEY_ORDER.index(key) if key in KEY_ORDER else len(KEY_ORDER)

    return sorted(dict.fromkeys(keys), key=rank)


def _hashable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _sort_value(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (2, "") if value is None else (1, str(value))
