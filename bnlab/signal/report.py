"""``signal.json``: the measurements of every batch and seed, as mean ± std, and the summary
numbers that ``bnlab compare`` tabulates.

Every number is a *stat* ``{"mean", "std", "n"}`` over the seed × batch measurements whose value
is finite (``std`` is the sample standard deviation, null for n < 2; all null for n = 0). The
document:

- ``positions``: one entry per measured activation (``name``, ``kind``, ``index``: see
  :mod:`bnlab.signal.positions`) with ``mean_sq`` and ``var``, and at slot inputs and block
  outputs ``cos_sim``, ``stable_rank`` and ``erank``;
- ``blocks``: one entry per residual block (``name``, ``index``) with ``mean_sq``, ``var`` (of its
  output), ``branch_var``, ``skip_var`` and ``branch_skip_ratio``: the Signal Propagation Plot;
- ``gradients``: ``layers`` (``name``, ``index``, ``norm``: ‖∂L/∂W_l‖_F) and ``fit``, the
  least-squares line through (l, mean over measurements of log ‖∂L/∂W_l‖) (``slope``,
  ``intercept``, ``r2``) with ``growth_per_layer`` = e^{−slope} as a stat of the per-measurement
  fits: the factor by which the gradient grows per layer toward the input;
- ``summary``: the numbers of :data:`SUMMARY` (stats), what ``compare`` shows per run.

**Growth with depth** (Yang et al. 2019). :func:`loglinear_fit` fits log y_l = a + b·l by least
squares; for gradient norms against layer index l, e^{−b} is the factor by which the gradient
grows per layer toward the input (> 1: it explodes toward the input).

This module imports no torch: ``bnlab compare`` and ``bnlab plot`` read signal run dirs with it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnlab.rundir import SIGNAL

if TYPE_CHECKING:
    from bnlab.signal.collect import BatchSignal
    from bnlab.signal.positions import Position, ResidualBlock

MOMENTS = ("mean_sq", "var")
GRAM = ("cos_sim", "stable_rank", "erank")  # at slot inputs and block outputs
BLOCK_MEASURES = ("mean_sq", "var", "branch_var", "skip_var", "branch_skip_ratio")

SUMMARY = {
    "grad_growth": ("grad growth /layer", "gradient growth per layer toward the input: "
                    "e^{−slope} of the log-linear fit of ‖∂L/∂W_l‖ against l"),
    "grad_first_last": ("grad first/last", "‖∂L/∂W_1‖ / ‖∂L/∂W_L‖: the first slot layer's "
                        "gradient norm over the last's"),
    "cos_sim_deepest": ("cos sim (deepest)", "mean cosine similarity of samples at the deepest "
                        "slot's input"),
    "stable_rank_deepest": ("stable rank (deepest)", "stable rank of the sample Gram matrix at "
                            "the deepest slot's input"),
    "erank_deepest": ("erank (deepest)", "effective rank of the sample Gram matrix at the "
                      "deepest slot's input"),
    "var_last_block": ("var (last block)", "average channel variance at the last residual "
                       "block's output"),
    "branch_skip_last_block": ("branch/skip (last block)", "residual-branch over skip-path "
                               "variance at the last residual block"),
}
"""The per-run numbers ``bnlab compare`` tabulates: key → (column header, meaning)."""


@dataclass(frozen=True)
class LineFit:
    """log y = intercept + slope·x, by least squares over the points with finite log y."""

    slope: float
    intercept: float
    r2: float  # the coefficient of determination of the fit in log space (NaN if y is flat)
    points: int

    @property
    def growth_toward_input(self) -> float:
        """e^{−slope}: the factor per unit of x by which y grows as x decreases."""
        return math.exp(-self.slope)


def loglinear_fit(x: list[float], y: list[float | None]) -> LineFit | None:
    """The least-squares line through (x_i, log y_i) over points with y_i > 0 finite; None when
    fewer than two distinct x remain."""
    pairs = [(a, math.log(b)) for a, b in zip(x, y, strict=True)
             if b is not None and math.isfinite(b) and b > 0]
    if len({a for a, _ in pairs}) < 2:
        return None
    x_mean = statistics.fmean(a for a, _ in pairs)
    y_mean = statistics.fmean(b for _, b in pairs)
    sxx = math.fsum((a - x_mean) ** 2 for a, _ in pairs)
    sxy = math.fsum((a - x_mean) * (b - y_mean) for a, b in pairs)
    syy = math.fsum((b - y_mean) ** 2 for _, b in pairs)
    slope = sxy / sxx
    residual = math.fsum((b - y_mean - slope * (a - x_mean)) ** 2 for a, b in pairs)
    r2 = 1 - residual / syy if syy > 0 else math.nan
    return LineFit(slope, y_mean - slope * x_mean, r2, len(pairs))


def stat(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std and count of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else None
    std = statistics.stdev(finite) if len(finite) > 1 else None
    return {"mean": mean, "std": std, "n": len(finite)}


def _gradient_section(batches: list[BatchSignal], grad_layers: list[str]) -> dict[str, Any]:
    index = list(range(1, len(grad_layers) + 1))
    layers = [{"name": name, "index": i, "norm": stat(b.grad_norms[name] for b in batches)}
              for i, name in zip(index, grad_layers, strict=True)]
    fits = [loglinear_fit(index, [b.grad_norms[n] for n in grad_layers]) for b in batches]
    geometric_means = [_geometric_mean(b.grad_norms[n] for b in batches) for n in grad_layers]
    line = loglinear_fit(index, geometric_means)
    fit = {"slope": None, "intercept": None, "r2": None} if line is None else {
        "slope": line.slope, "intercept": line.intercept, "r2": _finite(line.r2)}
    fit["growth_per_layer"] = stat(f.growth_toward_input for f in fits if f is not None)
    return {"layers": layers, "fit": fit}


def _geometric_mean(values: Iterable[float]) -> float:
    """exp(mean log v) over the finite v > 0 (NaN if none): the line through these is the
    least-squares line of all measurements' log norms when every measurement has them all."""
    logs = [math.log(v) for v in values if math.isfinite(v) and v > 0]
    return math.exp(statistics.fmean(logs)) if logs else math.nan


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def signal_document(batches: list[BatchSignal], positions: list[Position],
                    blocks: list[ResidualBlock], grad_layers: list[str],
                    config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The ``signal.json`` document of the measurements ``batches`` (see the module
    docstring)."""
    position_entries = [
        {"name": p.name, "kind": p.kind, "index": p.index,
         **{m: stat(b.positions[(p.kind, p.name)][m] for b in batches)
            for m in (*MOMENTS, *(GRAM if p.gram else ()))}}
        for p in positions]
    block_entries = [
        {"name": k.name, "index": k.index,
         **{m: stat(b.blocks[k.name][m] for b in batches) for m in BLOCK_MEASURES}}
        for k in blocks]
    gradients = _gradient_section(batches, grad_layers)
    deepest = [e for e in position_entries if e["kind"] == "slot_input"][-1:]
    first_last = stat(b.grad_norms[grad_layers[0]] / b.grad_norms[grad_layers[-1]]
                      if b.grad_norms[grad_layers[-1]] > 0 else None
                      for b in batches) if grad_layers else stat([])
    empty = stat([])
    summary = {
        "grad_growth": gradients["fit"]["growth_per_layer"],
        "grad_first_last": first_last,
        "cos_sim_deepest": deepest[0]["cos_sim"] if deepest else empty,
        "stable_rank_deepest": deepest[0]["stable_rank"] if deepest else empty,
        "erank_deepest": deepest[0]["erank"] if deepest else empty,
        "var_last_block": block_entries[-1]["var"] if block_entries else empty,
        "branch_skip_last_block": block_entries[-1]["branch_skip_ratio"] if block_entries
        else empty,
    }
    return {"kind": "signal", "status": "completed", "config": config, "settings": settings,
            "positions": position_entries, "blocks": block_entries, "gradients": gradients,
            "summary": summary}


def read_signal(run_dir: Path) -> dict[str, Any] | None:
    """``signal.json`` of ``run_dir``; None when it is missing or unreadable."""
    try:
        document = json.loads((run_dir / SIGNAL).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None
