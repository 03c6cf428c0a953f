"""The figure of a comparison of ``bnlab signal`` runs: each summary number against a numeric
setting that varies (``depth`` first, as in ``model.depth=8,16,32,64``), one line per value of
the other varying settings (e.g. per norm)."""

from __future__ import annotations

from matplotlib.figure import Figure

from bnlab.analysis.summary import Comparison, SettingRow
from bnlab.signal.report import SUMMARY

LOG_SCALE = ("grad_first_last", "var_last_block", "branch_skip_last_block")
PREFERRED_X = ("depth", "width", "blocks", "batch_size")


def _x_key(comparison: Comparison) -> str | None:
    """The varying setting to put on the x axis: numeric in every row, ``depth`` first."""
    numeric = [k for k in comparison.keys
               if all(isinstance(row.setting[k], int | float)
                      and not isinstance(row.setting[k], bool) for row in comparison.rows)]
    ranked = sorted(numeric, key=lambda k: PREFERRED_X.index(k) if k in PREFERRED_X
                    else len(PREFERRED_X))
    return ranked[0] if ranked else None


def signal_figure(comparison: Comparison) -> Figure | None:
    """Mean ± std of every summary number with values against the x setting; None when no
    numeric setting varies."""
    x_key = _x_key(comparison)
    if x_key is None:
        return None
    measures = [m for m in SUMMARY if any(row.stats[m].n for row in comparison.rows)]
    lines: dict[str, list[SettingRow]] = {}
    for row in comparison.rows:
        label = " ".join(f"{k}={v}" for k, v in row.setting.items() if k != x_key) or "runs"
        lines.setdefault(label, []).append(row)
    columns = min(3, len(measures))
    rows = -(-len(measures) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, measure in zip(axes, measures, strict=False):
        for index, (label, members) in enumerate(lines.items()):
            points = sorted((row.setting[x_key], row.stats[measure]) for row in members
                            if row.stats[measure].mean is not None)
            if points:
                ax.errorbar([p[0] for p in points], [p[1].mean for p in points],
                            yerr=[p[1].std or 0.0 for p in points], marker="o", capsize=3,
                            color=f"C{index % 10}", label=label)
        ax.set_title(SUMMARY[measure][0], fontsize="medium")
        ax.set_xlabel(x_key)
        if measure in LOG_SCALE:
            ax.set_yscale("log", nonpositive="mask")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(measures):]:
        ax.set_visible(False)
    if lines:
        axes[0].legend(fontsize="small")
    fig.suptitle("bnlab signal: mean ± std over seeds and batches", fontsize="medium")
    return fig
