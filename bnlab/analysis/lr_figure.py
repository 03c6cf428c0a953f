"""The learning-rate figure of a comparison: final test accuracy against learning rate."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from bnlab.analysis.summary import Comparison, Stability

# Series at the same learning rates are nudged apart by this many decades so that their
# error bars do not hide each other.
NUDGE_DECADES = 0.015


def lr_figure(comparison: Comparison) -> Figure | None:
    """Mean final test accuracy (± std over seeds) per learning rate, one line per norm;
    diverged seeds as an × at the bottom. None when no run recorded a positive lr."""
    series = [s for s in comparison.stability if any(row.lr > 0 for row in s.rows)]
    if not series:
        return None
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for index, stability in enumerate(series):
        offset = 10 ** (NUDGE_DECADES * (index - (len(series) - 1) / 2))
        _draw_series(ax, stability, offset, color=f"C{index % 10}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("Final test accuracy vs learning rate (mean ± std over seeds; × = diverged; "
                 "▼ = lr at divergence of a range test)", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title=_legend_title(comparison), fontsize="small")
    return fig


def _draw_series(ax, stability: Stability, offset: float, color: str) -> None:
    rows = [row for row in stability.rows if row.lr > 0]
    scored = [row for row in rows if row.stats["final_test_acc"].mean is not None]
    if scored:
        lrs = np.array([row.lr * offset for row in scored])
        means = np.array([row.stats["final_test_acc"].mean for row in scored]) * 100
        stds = np.array([row.stats["final_test_acc"].std or 0.0 for row in scored]) * 100
        ax.errorbar(lrs, means, yerr=stds, color=color, marker="o", capsize=3,
                    label=stability.label)
    else:  # every seed diverged before an evaluation: only the × marks show the series
        ax.plot([], [], color=color, marker="o", label=stability.label)
    # The × sits at the bottom of the axes whatever the accuracy range.
    bottom = ax.get_xaxis_transform()
    for row in rows:  # range-test runs: the lr at divergence, a ▼ at the top with its ± std
        stat = row.stats.get("lr_at_divergence")
        if stat is not None and stat.mean is not None:
            err = [[stat.mean - max(stat.mean - (stat.std or 0.0), stat.mean * 1e-3)],
                   [stat.std or 0.0]]
            ax.errorbar(stat.mean, 0.97, xerr=err, marker="v", markersize=8, color=color,
                        capsize=3, transform=bottom, clip_on=False)
            ax.annotate(f"diverged at lr {stat.mean:.3g}", (stat.mean, 0.97), xycoords=bottom,
                        xytext=(6, -12), textcoords="offset points", fontsize="x-small",
                        color=color)
    for row in rows:
        if row.diverged_steps:
            ax.plot(row.lr * offset, 0.03, marker="x", markersize=9, mew=2, color=color,
                    transform=bottom, clip_on=False)
            ax.annotate(f"{len(row.diverged_steps)}/{len(row.runs)}", (row.lr * offset, 0.03),
                        xycoords=bottom, xytext=(5, 4), textcoords="offset points",
                        fontsize="x-small", color=color)


def _legend_title(comparison: Comparison) -> str:
    keys = [k for k in comparison.keys if k != "lr"]
    return ", ".join(keys) if keys else "runs"
