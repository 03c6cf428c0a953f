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

# Display order of the summary-config keys; others follow in the order the runs name them.
KEY_ORDER = ("norm", "norm_slots", "norm_rest", "model", "lr", "dropout", "batch_size",
             "optimizer", "momentum", "weight_decay", "sched", "epochs", "data")
# The per-run numbers that rows aggregate over seeds.
METRICS = ("final_test_acc", "final_test_acc_precise_bn", "best_test_acc", "gap",
           "lr_at_divergence", "peak_grad_norm", "drift_w1", "ics_l2", "ics_cos",
           "white_offdiag", "bnstats_mean_shift")


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


def run_numbers(run: Run, events: Events) -> dict[str, float | None]:
    """The numbers one run contributes to its row; None where not logged.

    Besides accuracies and means over training: ``white_offdiag``, the deepest watched
    layer's (the last logged: the output of the last watched slot) mean |off-diagonal
    correlation| at the last probe; ``bnstats_mean_shift``, the mean over norm layers of the
    last probe's batch-vs-running mean shift; ``final_test_acc_precise_bn`` and
    ``lr_at_divergence`` as metrics.json has them.
    """
    final, train = _number(run.metric("final_test_acc")), _number(run.metric("final_train_acc"))
    grad = events.scalars.get("grad/global_norm")
    finite_grad = grad.values[np.isfinite(grad.values)] if grad else np.array([])
    whiteness = events.tags("white/offdiag_corr/")
    shifts = [_last(events, tag) for tag in events.tags("bnstats/mean_shift/")]
    return {
        "final_test_acc": final,
        "final_test_acc_precise_bn": _number(run.metric("final_test_acc_precise_bn")),
        "best_test_acc": _number(run.metric("best_test_acc")),
        "gap": train - final if train is not None and final is not None else None,
        "lr_at_divergence": _number(run.metric("lr_at_divergence")),
        # Non-finite norms mark divergence, which the diverged column already reports.
        "peak_grad_norm": float(finite_grad.max()) if finite_grad.size else None,
        "drift_w1": _layer_mean(events, "drift/w1/"),
        "ics_l2": _layer_mean(events, "ics/l2/"),
        "ics_cos": _layer_mean(events, "ics/cos/"),
        "white_offdiag": _last(events, whiteness[-1]) if whiteness else None,
        "bnstats_mean_shift": _mean_of(shifts),
    }


def compare_runs(runs: list[Run], numbers: dict[Path, dict[str, float | None]]) -> Comparison:
    """Group finished runs into settings; list the others apart. `numbers` by run path."""
    finished = [run for run in runs if run.finished]
    keys, fixed = setting_keys(finished)
    groups: dict[str, list[Run]] = {}
    for run in finished:
        groups.setdefault(_hashable(setting_of(run, keys)), []).append(run)
    rows = [_row(setting_of(g[0], keys), g, numbers) for g in groups.values()]
    rows.sort(key=lambda row: [_sort_value(row.setting[k]) for k in keys])
    return Comparison(
        keys=keys,
        fixed=fixed,
        rows=rows,
        stability=_stability(rows),
        unfinished=sorted((run for run in runs if not run.finished), key=lambda r: r.path),
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


def _row(setting: dict[str, Any], runs: list[Run], numbers: dict[Path, dict]) -> SettingRow:
    runs = sorted(runs, key=lambda r: _sort_value(r.config.get("seed")))
    stats = {m: Stat.of(numbers.get(run.path, {}).get(m) for run in runs) for m in METRICS}
    return SettingRow(setting, tuple(runs), stats)


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


def _layer_mean(events: Events, prefix: str) -> float | None:
    """Mean over layers of each layer's mean over steps (finite values only)."""
    means = []
    for tag in events.tags(prefix):
        values = events.scalars[tag].values
        values = values[np.isfinite(values)]
        if values.size:
            means.append(float(values.mean()))
    return _mean_of(means)


def _last(events: Events, tag: str) -> float | None:
    """The value at the last step of ``tag``; None if it is not finite (a diverged run's last
    probe is NaN: its final state is no number to average)."""
    values = events.scalars[tag].values
    return _number(float(values[-1])) if values.size else None


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
