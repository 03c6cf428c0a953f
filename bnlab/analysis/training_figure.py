"""The training-dynamics figure of `bnlab plot`: one column per run, one row per quantity.

Rows, where any run logged them: the activation percentile bands of each chosen layer over
training (Ioffe & Szegedy 2015, Fig. 1: 15th, 50th and 85th percentile), the global gradient
norm, activation drift, gradient-based ICS, whiteness of the activations (``white/``), the
mismatch of batch and running statistics (``bnstats/``), and histogram snapshots of each
chosen layer.
Curves over steps share each row's y axis, so runs side by side compare at a glance.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

from bnlab.analysis.events import Events, Series, Snapshot
from bnlab.analysis.runs import Run
from bnlab.probes.base import plot_panels

# Line rows, the probes' panels: scalar tag prefix (one tag per layer) and the row's y label;
# the prefixes of those whose values span decades (a singular covariance's condition number is
# 1e12) get a log axis.
LINE_ROWS = {panel.prefix: panel.label for panel in plot_panels()}
LOG_ROWS = tuple(panel.prefix for panel in plot_panels() if panel.log)
GRAD_TAG = "grad/global_norm"
TITLE = ("Activation percentiles 15/50/85 over training (Ioffe & Szegedy 2015, Fig. 1); "
         "gradient norm, activation drift, ICS, whiteness and batch-vs-running statistics")
HIST_BINS = 50


@dataclass(frozen=True)
class RunData:
    """A run with its events and the histogram snapshots chosen for each layer."""

    run: Run
    events: Events
    snapshots: dict[str, list[Snapshot]] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    kind: str  # "bands", "grad", "lines" or "hist"
    key: str  # the layer for bands and hist, the tag prefix for lines


def plan_rows(runs: list[RunData], layers: list[str]) -> list[Row]:
    """The rows that at least one run has data for, in reading order."""
    def logged(tag: str) -> bool:
        return any(tag in data.events.scalars for data in runs)

    rows = [Row("bands", layer) for layer in layers if logged(f"act/p50/{layer}")]
    if logged(GRAD_TAG):
        rows.append(Row("grad", GRAD_TAG))
    rows += [Row("lines", prefix) for prefix in LINE_ROWS
             if any(data.events.tags(prefix) for data in runs)]
    rows += [Row("hist", layer) for layer in layers
             if any(data.snapshots.get(layer) for data in runs)]
    return rows


def training_figure(runs: list[RunData], layers: list[str], rows: list[Row]) -> Figure:
    fig = _grid_figure(len(rows), len(runs))
    axes = fig.subplots(len(rows), len(runs), squeeze=False)
    for r, row in enumerate(rows):
        axes[r, 0].set_ylabel(_row_label(row))
        # Curves over steps share the row's y axis, so runs compare at a glance. Histograms
        # keep their own axes: next to a diverging run, a healthy one would be a flat line.
        if row.kind != "hist":
            for ax in axes[r, 1:]:
                ax.sharey(axes[r, 0])
                ax.tick_params(labelleft=False)
    colors = _layer_colors(runs, layers)
    for col, data in enumerate(runs):
        axes[0, col].set_title(_run_title(data.run), fontsize="medium")
        for r, row in enumerate(rows):
            _draw(axes[r, col], row, data, layers, colors, legend=col == 0 or row.kind != "bands")
    # About nine characters of large text per inch: wrap the title to the figure's width.
    title = textwrap.fill(TITLE, width=int(fig.get_figwidth() * 9))
    fig.suptitle(title, fontsize="large", va="top", y=1 - 0.1 / fig.get_figheight())
    return fig


def _grid_figure(nrows: int, ncols: int) -> Figure:
    """A figure sized from fixed panel sizes and margins in inches. Laid out by hand because
    matplotlib's automatic layouts cost seconds on a grid this large and gain nothing here."""
    left, right, top, bottom = 1.1, 0.25, 1.5, 0.55  # room for labels and titles
    panel_w, panel_h, gap_w, gap_h = 4.2, 2.0, 0.3, 0.7  # gap_h: the x label of the row above
    width = left + ncols * panel_w + (ncols - 1) * gap_w + right
    height = top + nrows * panel_h + (nrows - 1) * gap_h + bottom
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height,
                        bottom=bottom / height, wspace=gap_w / panel_w, hspace=gap_h / panel_h)
    return fig


def _draw(ax: Axes, row: Row, data: RunData, layers: list[str], colors: dict[str, str],
          legend: bool) -> None:
    events = data.events
    if row.kind == "hist":
        drawn = _draw_hist(ax, data.snapshots.get(row.key, []))
    else:
        if row.kind == "bands":
            drawn = _draw_bands(ax, events, row.key)
        elif row.kind == "grad":
            drawn = _draw_grad(ax, events)
        else:
            drawn = _draw_lines(ax, events, row.key, layers, colors)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _mark_divergence(ax, data.run)
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                color="grey")
    elif legend:
        ax.legend(fontsize="x-small")
    ax.grid(True, alpha=0.3)


def _draw_bands(ax: Axes, events: Events, layer: str) -> bool:
    series = [events.scalars.get(f"act/{p}/{layer}") for p in ("p15", "p50", "p85")]
    if any(s is None for s in series):
        return False
    steps = np.intersect1d(np.intersect1d(series[0].steps, series[1].steps), series[2].steps)
    low, mid, high = (s.values[np.isin(s.steps, steps)] for s in series)
    ax.fill_between(steps, low, high, alpha=0.3, color="C0", label="15th–85th pct")
    ax.plot(steps, mid, color="C0", label="median")
    return True


def _draw_grad(ax: Axes, events: Events) -> bool:
    series = events.scalars.get(GRAD_TAG)
    if series is None:
        return False
    finite = np.isfinite(series.values)
    ax.plot(series.steps[finite], series.values[finite], color="C3", label="global norm",
            marker=_marker(series))
    if np.all(series.values[finite] > 0):  # norms span decades around instabilities
        ax.set_yscale("log")
        # Plain numbers (3, not 3×10⁰); minor ticks labelled only where decades are few.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    return True


def _draw_lines(ax: Axes, events: Events, prefix: str, layers: list[str],
                colors: dict[str, str]) -> bool:
    logged = events.layers(prefix)
    # The chosen layers where this group logged them, else whatever it logged.
    shown = [layer for layer in layers if layer in logged] or logged
    for layer in shown:
        series = events.scalars[prefix + layer]
        ax.plot(series.steps, series.values, color=colors.get(layer), label=layer,
                marker=_marker(series))
    if prefix in LOG_ROWS and shown:
        values = np.concatenate([events.scalars[prefix + layer].values for layer in shown])
        if np.all(values[np.isfinite(values)] > 0):
            ax.set_yscale("log")
    return bool(shown)


def _marker(series: Series) -> str | None:
    """Dots on short curves, so that a curve of one point still shows."""
    return "." if len(series.steps) <= 40 else None


def _draw_hist(ax: Axes, snapshots: list[Snapshot]) -> bool:
    if not snapshots:
        return False
    # The central 99% of every snapshot: a few far outliers would squash the rest to a spike.
    low = min(_quantile(snap, 0.005) for snap in snapshots)
    high = max(_quantile(snap, 0.995) for snap in snapshots)
    if high <= low:  # every value equal, e.g. a dead layer: a unit range around the value
        low, high = low - 0.5, high + 0.5
    for shade, snap in zip(np.linspace(0.15, 0.85, len(snapshots)), snapshots, strict=True):
        edges, density = _uniform_density(snap, low, high)
        ax.stairs(density, edges, color=colormaps["viridis"](shade), label=f"step {snap.step}")
    ax.set_xlabel("activation value (central 99%)")
    return True


def _uniform_density(snap: Snapshot, low: float, high: float,
                     bins: int = HIST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """The histogram on `bins` equal bins over [low, high], as a density of all values.

    Writers bucket exponentially (very narrow buckets near zero), which drawn as is turns a
    few values near zero into tall spikes; spreading each bucket's count evenly over its
    width and re-binning, as TensorBoard does for display, shows the distribution instead.
    """
    grid = np.linspace(low, high, bins + 1)
    cdf = _cdf(snap)
    # Equal edges (zero-width buckets) hold no count, so np.interp's tie choice is harmless.
    counts = np.diff(np.interp(grid, snap.edges, cdf))
    total = cdf[-1]
    density = counts / (total * np.diff(grid)) if total > 0 else np.zeros(bins)
    return grid, density


def _quantile(snap: Snapshot, q: float) -> float:
    cdf = _cdf(snap)
    return float(np.interp(q * cdf[-1], cdf, snap.edges))


def _cdf(snap: Snapshot) -> np.ndarray:
    """Counts at or below each edge."""
    return np.concatenate([[0.0], np.cumsum(snap.counts)])


def _mark_divergence(ax: Axes, run: Run) -> None:
    step = run.metric("diverged_step")
    if run.diverged and isinstance(step, int):
        ax.axvline(step, color="red", linestyle=":", linewidth=1.2, label="diverged")


def _layer_colors(runs: list[RunData], layers: list[str]) -> dict[str, str]:
    """One colour per layer across all panels, the chosen layers first."""
    names = list(layers)
    for data in runs:
        for prefix in LINE_ROWS:
            names += data.events.layers(prefix)
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


def _row_label(row: Row) -> str:
    if row.kind == "bands":
        return f"{row.key}\nactivation"
    if row.kind == "hist":
        return f"{row.key}\ndensity"
    if row.kind == "grad":
        return "global gradient norm"
    return LINE_ROWS[row.key]


def _run_title(run: Run) -> str:
    title = textwrap.fill(run.describe() or run.path.name, 40)
    if run.diverged:
        return f"{title}\n(diverged at step {run.metric('diverged_step')})"
    return title if run.status == "completed" else f"{title}\n({run.status})"

