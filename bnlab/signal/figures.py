"""The figures of ``signal.json`` documents: a run's three figures, and the overlay of several
runs that ``bnlab plot`` draws for signal run dirs.

- **SPP** (Brock et al. 2021, Fig. 1): the average channel squared mean and the average channel
  variance at each residual block's output, and the branch-over-skip variance, against the block
  index. A net without residual blocks shows the two moments at its norm slots' outputs, against
  the slot index.
- **Gram**: the mean cosine similarity of samples, and the stable and effective rank of their
  Gram matrix, at each norm slot's input, against the slot index.
- **Gradients**: ‖∂L/∂W_l‖ against the slot index on a log scale, with the fitted line (dashed)
  and its growth per layer toward the input in the panel's legend.

Points are means over the seeds and batches, bars ± one standard deviation; one colour per run,
named in the legend below the panels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.analysis.output import figure_bytes, write_atomic

Doc = dict[str, Any]
Runs = Sequence[tuple[str, Doc]]  # (legend label, signal.json document)
RUN_FIGURES = ("spp", "gram", "gradients")
PANEL = (4.2, 3.2)  # inches per panel


def _series(entries: list[Doc], measure: str) -> tuple[list[int], list[float], list[float]]:
    """x, mean and std of ``measure`` over ``entries``, points without a mean left out."""
    points = [(e["index"], e[measure]["mean"], e[measure]["std"] or 0.0) for e in entries
              if e[measure]["mean"] is not None]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def _plot(ax: Axes, entries: list[Doc], measure: str, label: str, color: str) -> None:
    x, y, err = _series(entries, measure)
    if x:
        ax.errorbar(x, y, yerr=err, label=label, color=color, marker="o", markersize=3,
                    capsize=2, linewidth=1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _color(i: int) -> str:
    return f"C{i % 10}"


def _spp_entries(doc: Doc) -> list[Doc]:
    if doc["blocks"]:
        return doc["blocks"]
    return [p for p in doc["positions"] if p["kind"] == "slot_input"]


def draw_spp(axes: Sequence[Axes], runs: Runs) -> None:
    titles = {"mean_sq": "average channel squared mean", "var": "average channel variance",
              "branch_skip_ratio": "residual branch / skip path variance"}
    for ax, (measure, title) in zip(axes, titles.items(), strict=True):
        for i, (label, doc) in enumerate(runs):
            if measure in ("mean_sq", "var") or doc["blocks"]:
                _plot(ax, _spp_entries(doc), measure, label, _color(i))
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlabel("residual block (slot input, without blocks)", fontsize=8)


def draw_gram(axes: Sequence[Axes], runs: Runs) -> None:
    titles = {"cos_sim": "sample cosine similarity", "stable_rank": "stable rank of sample Gram",
              "erank": "effective rank of sample Gram"}
    for ax, (measure, title) in zip(axes, titles.items(), strict=True):
        for i, (label, doc) in enumerate(runs):
            inputs = [p for p in doc["positions"] if p["kind"] == "slot_input"]
            _plot(ax, inputs, measure, label, _color(i))
        ax.set_title(f"{title} (slot inputs)", fontsize=9)
        ax.set_xlabel("norm slot", fontsize=8)


def draw_gradients(ax: Axes, runs: Runs) -> None:
    for i, (_, doc) in enumerate(runs):
        grads, fit = doc["gradients"]["layers"], doc["gradients"]["fit"]
        growth = fit["growth_per_layer"]["mean"]
        _plot(ax, grads, "norm", "no fit" if growth is None else
              f"fit: ×{growth:.3g}/layer toward input", _color(i))
        if fit["slope"] is not None and grads:
            xs = [grads[0]["index"], grads[-1]["index"]]
            ax.plot(xs, [math.exp(fit["intercept"] + fit["slope"] * x) for x in xs],
                    linestyle="--", color=_color(i), linewidth=1)
    ax.set_yscale("log", nonpositive="mask")
    ax.set_title("gradient norm ‖∂L/∂W_l‖ (dashed: log-linear fit)", fontsize=9)
    ax.set_xlabel("norm slot (layer) index", fontsize=8)


def _finish(fig: Figure, axes: Sequence[Axes], runs: Runs, gradients: Axes | None) -> None:
    """Small ticks, the gradient panel's rates, and one legend of the runs below the panels."""
    for ax in axes:
        ax.tick_params(which="both", labelsize=7)
    if gradients is not None and gradients.has_data():
        gradients.legend(fontsize=7)
    handles = [ax.plot([], [], color=_color(i), marker="o", markersize=3)[0]
               for i in range(len(runs))]
    fig.legend(handles, [label for label, _ in runs], loc="lower center", ncols=min(3, len(runs)),
               fontsize=8, frameon=False)
    # Fixed margins in inches (tight_layout would take most of the time of a run's figures).
    width, height = fig.get_size_inches()
    legend = 0.22 * math.ceil(len(runs) / 3) + 0.1
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, top=1 - 0.3 / height,
                        bottom=(0.5 + legend) / height, wspace=0.28, hspace=0.5)


def run_figures(label: str, doc: Doc) -> dict[str, Figure]:
    """The SPP, Gram and gradient figures of one run."""
    runs = [(label, doc)]
    figures = {}
    for name in ("spp", "gram"):
        fig = Figure(figsize=(3 * PANEL[0], 1.15 * PANEL[1]))
        axes = fig.subplots(1, 3)
        (draw_spp if name == "spp" else draw_gram)(axes, runs)
        _finish(fig, axes, runs, None)
        figures[name] = fig
    fig = Figure(figsize=(1.5 * PANEL[0], 1.3 * PANEL[1]))
    ax = fig.subplots()
    draw_gradients(ax, runs)
    _finish(fig, [ax], runs, ax)
    figures["gradients"] = fig
    return figures


def overlay_figure(runs: Runs) -> Figure:
    """Every run's SPP, Gram and gradient curves, one colour per run."""
    fig = Figure(figsize=(3 * PANEL[0], 3 * PANEL[1] + 0.3 * math.ceil(len(runs) / 3)))
    grid = fig.add_gridspec(3, 3)
    spp = [fig.add_subplot(grid[0, i]) for i in range(3)]
    gram = [fig.add_subplot(grid[1, i]) for i in range(3)]
    grads = fig.add_subplot(grid[2, :])
    draw_spp(spp, runs)
    draw_gram(gram, runs)
    draw_gradients(grads, runs)
    _finish(fig, [*spp, *gram, grads], runs, grads)
    return fig


def describe(doc: Doc) -> str:
    """A short label of a signal run: its norm and model (with depth when it has one)."""
    config = doc.get("config", {})
    keys = ("norm", "model", "depth")
    return " ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None)


def write_run_figures(run_dir: Path, doc: Doc) -> None:
    """``spp.png``, ``gram.png`` and ``gradients.png`` of the run in ``run_dir``."""
    for name, fig in run_figures(describe(doc), doc).items():
        write_atomic(run_dir / f"{name}.png", figure_bytes(fig, "png"))
