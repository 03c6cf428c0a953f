"""The curvature figure: Hessian eigenvalue densities on a log scale and the top eigenvalues,
one or more results of ``bnlab curvature`` (its ``curvature.json``) overlaid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.errors import UsageError
from bnlab.rundir import CURVATURE

# Densities below this are drawn at it: a log axis needs a floor, and a Gaussian's far tail
# (down to 1e-300) would otherwise stretch the axis over decades that carry nothing.
DENSITY_FLOOR = 1e-7


def read_curvature(path: Path) -> dict:
    """The ``curvature.json`` at ``path``, or in the run dir ``path``."""
    file = path / CURVATURE if path.is_dir() else path
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"no {CURVATURE} in {path}: run `bnlab curvature {path}` first"
                         if path.is_dir() else f"no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {file}: {e}") from None
    if not isinstance(result, dict) or "density" not in result:
        raise UsageError(f"{file} is not a result of bnlab curvature")
    return result


def label(result: dict) -> str:
    """Run dir name, epoch and statistics mode (and the parameter block, if one)."""
    name = Path(result["run_dir"]).name
    block = f", params {'+'.join(result['params'])}" if result.get("params") else ""
    return f"{name}: epoch {result['epoch']}, bn={result['bn']}{block}"


def curvature_figure(results: list[dict]) -> Figure:
    """Left: each result's eigenvalue density (log scale); right: its top eigenvalues by rank,
    with the trace estimate and gradient overlap in the legend."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_density, ax_top = fig.subplots(1, 2, width_ratios=(2, 1))
    for index, result in enumerate(results):
        color = f"C{index % 10}"
        grid = np.asarray(result["density"]["grid"])
        density = np.maximum(np.asarray(result["density"]["density"]), DENSITY_FLOOR)
        ax_density.plot(grid, density, color=color, lw=1, label=label(result))
        top = result["top_eigenvalues"]
        trace = result["trace"]
        ax_top.plot(np.arange(1, len(top) + 1), top, "o-", color=color, ms=4,
                    label=f"tr ≈ {trace['estimate']:.4g} ± {trace['stderr']:.2g}, "
                    f"overlap {result['gradient_overlap']:.3f}")
    ax_density.set_yscale("log")
    ax_density.set_xlabel("eigenvalue")
    ax_density.set_ylabel("density (log scale)")
    ax_density.set_title("Hessian eigenvalue density (stochastic Lanczos quadrature)",
                         fontsize="medium")
    ax_density.legend(fontsize="x-small")
    ax_top.set_xlabel("rank")
    ax_top.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_top.set_ylabel("eigenvalue")
    ax_top.set_title(f"top {max(len(r['top_eigenvalues']) for r in results)} eigenvalues "
                     "(Lanczos)", fontsize="medium")
    ax_top.legend(fontsize="x-small", title="trace, ‖P_k g‖²/‖g‖²", title_fontsize="x-small")
    for ax in (ax_density, ax_top):
        ax.grid(True, alpha=0.3)
    return fig
