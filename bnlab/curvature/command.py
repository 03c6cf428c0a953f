"""``bnlab curvature RUN_DIR``: the curvature measures of a run's checkpoint, offline.

The model is rebuilt from the run's own config (``.hydra/config.yaml``, through
``bnlab.train.build``) and loaded from ``checkpoint.pt`` (the latest) or, with ``--epoch``,
from a checkpoint the run kept (``keep_epoch_checkpoints``). It is measured in eval mode
(dropout off) with its norm layers' statistics chosen by ``--bn``, on a fixed batch of the
run's own training data: the first ``--batch-size`` images of the training split, class-
balanced, un-augmented, normalized as in training. ``population`` statistics come from the
run's training batches of that epoch (as its Precise BN evaluation draws them), one epoch's
worth unless ``--population-batches`` says otherwise. One Hessian operator serves every
measure: the top ``k`` eigenvalues and the gradient overlap from one Lanczos run, the trace,
and the density. Results go to ``curvature.json`` and a figure next to it (``.png``).
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bnlab import data as datasets
from bnlab.analysis.curvature_figure import curvature_figure
from bnlab.analysis.output import check_writable, figure_bytes, write_atomic
from bnlab.curvature.lanczos import broaden
from bnlab.curvature.measures import (
    overlap_of,
    quadrature_of,
    top_eigenpairs_of,
    trace_of,
    validate_settings,
)
from bnlab.curvature.operator import BN_MODES, hessian_operator, select_parameters
from bnlab.errors import UsageError
from bnlab.rundir import (
    CHECKPOINT,
    CURVATURE,
    HYDRA_DIR,
    epoch_checkpoint,
    kept_epochs,
    write_json,
)
from bnlab.runtime import memory_format, pick_device
from bnlab.train import build


@dataclass(frozen=True)
class Settings:
    """The options of ``bnlab curvature`` (see ``bnlab curvature --help``)."""

    epoch: int | None = None
    bn: str = "batch"
    batch_size: int = 256
    k: int = 10
    iters: int = 100
    tol: float = 1e-3
    samples: int = 50
    runs: int = 1
    steps: int = 80
    params: list[str] = field(default_factory=list)
    population_batches: int | None = None
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    grid_points: int = 2001
    broadening: float = 1e-3


def run_curvature(run_dir: Path, settings: Settings, out: Path | None = None) -> dict:
    """Measure, write ``out`` (default ``RUN_DIR/curvature.json``) and its figure, and return
    the result. Every input is checked before the checkpoint is read."""
    s = settings
    config, checkpoint = _check_run_dir(run_dir, s.epoch)
    if s.bn not in BN_MODES:
        raise UsageError(f"--bn {s.bn!r} is invalid; allowed: {', '.join(BN_MODES)}")
    validate_settings(k=s.k, iters=s.iters, tol=s.tol, samples=s.samples, runs=s.runs,
                      steps=s.steps, grid_points=s.grid_points, broadening=s.broadening)
    for name, value in (("--batch-size", s.batch_size), ("--population-batches",
                                                         s.population_batches or 1)):
        if value < 1:
            raise UsageError(f"{name} {value} is invalid; allowed: an integer >= 1")
    out = out or run_dir / CURVATURE
    figure = out.with_suffix(".png")
    for path in (out, figure):
        check_writable(path, "--out")
    cfg = OmegaConf.load(config)
    if s.data_root is not None:
        cfg.data.root = s.data_root
    device = pick_device(s.device)
    fmt = memory_format(cfg, device)
    model = build(cfg, device, fmt)
    params = s.params or None
    dim = sum(p.numel() for n, p in model.named_parameters()
              if n in select_parameters(model, params))
    if s.k > dim:
        raise UsageError(f"--k {s.k} is larger than the number of parameters ({dim})")
    state = _load(checkpoint, device)
    model.load_state_dict(state["model"])
    model.eval()
    progress = state.get("progress", {})
    data = datasets.load(cfg.data, device, cfg.seed)
    x, y = _measured_batch(data, s.batch_size, fmt)
    started = time.perf_counter()
    population = _population_inputs(data, cfg, progress.get("epoch", 0), s.population_batches,
                                    fmt) if s.bn == "population" else None
    op = hessian_operator(model, F.cross_entropy, x, y, params, s.bn, population)
    pairs = top_eigenpairs_of(op, s.k, s.iters, s.tol, s.seed)
    trace, stderr = trace_of(op, s.samples, s.seed)
    nodes, weights = quadrature_of(op, s.runs, s.steps, s.seed)
    grid, density, sigma = broaden(nodes, weights, s.grid_points, s.broadening)
    result = {
        "run_dir": str(run_dir), "checkpoint": str(checkpoint.relative_to(run_dir)),
        "epoch": progress.get("epoch"), "step": progress.get("step"), "bn": s.bn,
        "params": s.params, "dim": op.dim, "batch_size": len(y), "loss": float(op.loss),
        "gradient_norm": float(torch.linalg.vector_norm(op.gradient)),
        "top_eigenvalues": pairs.values.tolist(), "residuals": pairs.residuals.tolist(),
        "lanczos_steps": pairs.steps, "converged": pairs.converged,
        "gradient_overlap": overlap_of(op, pairs),
        "trace": {"estimate": trace, "stderr": stderr, "samples": s.samples},
        "density": {"grid": grid.tolist(), "density": density.tolist(), "sigma": sigma,
                    "runs": s.runs, "steps": s.steps,
                    "nodes": [t.tolist() for t in nodes],
                    "weights": [w.tolist() for w in weights]},
        "settings": asdict(s),
        "time_s": round(time.perf_counter() - started, 3),
    }
    write_json(out, result)
    write_atomic(figure, figure_bytes(curvature_figure([result]), "png"))
    top = ", ".join(f"{v:.4g}" for v in result["top_eigenvalues"])
    print(f"top eigenvalues {top}; trace {trace:.4g} ± {stderr:.2g}; gradient overlap "
          f"{result['gradient_overlap']:.3f}\nWrote {out} and {figure}", file=sys.stderr)
    return result


def _check_run_dir(run_dir: Path, epoch: int | None) -> tuple[Path, Path]:
    """The run's config file and the checkpoint to measure."""
    if not run_dir.is_dir():
        raise UsageError(f"no such run dir: {run_dir}")
    config = run_dir / HYDRA_DIR / "config.yaml"
    if not config.is_file():
        raise UsageError(f"not a run dir: {run_dir} (no {HYDRA_DIR}/config.yaml)")
    if epoch is None:
        checkpoint = run_dir / CHECKPOINT
        if not checkpoint.is_file():
            raise UsageError(f"{run_dir} has no {CHECKPOINT}: the run saved no checkpoint yet "
                             "(one is written at every epoch's end)")
        return config, checkpoint
    kept = kept_epochs(run_dir)
    if epoch not in kept:
        have = (f"kept: {', '.join(map(str, kept))}" if kept else
                "it kept none; train with keep_epoch_checkpoints=true to keep one per epoch")
        raise UsageError(f"--epoch {epoch}: {run_dir} kept no checkpoint of epoch {epoch} "
                         f"({have})")
    return config, run_dir / epoch_checkpoint(epoch)


def _load(path: Path, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UsageError(f"{path} is not a bnlab checkpoint (no model state)")
    return state


def _measured_batch(data: datasets.Dataset, size: int, fmt: torch.memory_format
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    split = datasets.balanced_subset(data.train, size)
    x = datasets.normalize(split.images, data.mean, data.std)
    return x.contiguous(memory_format=fmt), split.labels


def _population_inputs(data: datasets.Dataset, cfg: DictConfig, epoch: int,
                       count: int | None, fmt: torch.memory_format) -> Iterator[torch.Tensor]:
    """The run's training batches of ``epoch`` (the first ``count``, else all), inputs only."""
    batches = datasets.train_batches(data, cfg.batch_size, cfg.seed, epoch, 0, 0,
                                     cfg.data.augment)
    inputs = (x.contiguous(memory_format=fmt) for x, _ in batches)
    return itertools.islice(inputs, count) if count else inputs
