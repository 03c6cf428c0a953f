"""Synthetic run and sweep dirs in the exact layout `bnlab train` writes, for analysis tests.

Event files are written with torch's SummaryWriter, so the reader under test meets real
TensorBoard files. Logged values follow simple formulas of the step and seed; `write_run`
returns the numbers a comparison should derive from them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter

LAYERS = ("features.0", "features.1", "features.4", "classifier.1")
NORMS = ("features.1", "classifier.1")  # the norm layers among LAYERS (bnstats/ tags)
EXCLUDE_KEYS = ["experiment", "resume", "overwrite", "device", "threads", "progress"]
BASE_CONFIG = {
    "norm": "custom", "model": "cnn", "lr": 0.1, "dropout": 0.0, "batch_size": 128, "seed": 0,
    "epochs": 2, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0005,
    "sched": "cosine", "data": "synthetic",
}


def job_name(overrides: dict[str, Any]) -> str:
    """Hydra's override_dirname: `norm=custom,optim.lr=0.1,seed=0`."""
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def write_run(
    run_dir: Path,
    *,
    norm: str = "custom",
    lr: float = 0.1,
    dropout: float = 0.0,
    seed: int = 0,
    status: str = "completed",
    final_test_acc: float | None = 0.6,
    best_test_acc: float | None = 0.62,
    final_train_acc: float | None = 0.7,
    diverged_step: int | None = None,
    steps: int = 40,
    probes: bool = True,
    hist_bins: str | int = "tensorflow",
    extra_overrides: dict[str, Any] | None = None,
    final_test_acc_precise_bn: float | None = None,
    lr_at_divergence: float | None = None,
) -> dict[str, Any]:
    """Write one complete run dir and return what a comparison should read back from it:
    `metrics` (the metrics.json document) and the event-derived numbers. `hist_bins` as in
    SummaryWriter.add_histogram: the default, the tracker's, writes ~600 buckets per
    histogram; a small number keeps big sweeps quick to write and read. The metrics.json
    keys `final_test_acc_precise_bn` and `lr_at_divergence` are written only when given, as
    runs without Precise BN or divergence (or from before these keys) have none."""
    config = {**BASE_CONFIG, "norm": norm, "lr": lr, "dropout": dropout, "seed": seed}
    overrides = {"norm": norm, "optim.lr": lr, "model.dropout": dropout, "seed": seed,
                 **(extra_overrides or {})}
    write_hydra(run_dir, config, overrides)
    metrics = {
        "status": status, "final_test_acc": final_test_acc, "best_test_acc": best_test_acc,
        "final_train_loss": 1.0, "final_train_acc": final_train_acc,
        "diverged": diverged_step is not None, "diverged_step": diverged_step,
        "epochs_completed": 2, "steps": steps, "wall_time_s": 3.0, "images_per_s": 800.0,
        "peak_rss_mb": 500.0, "config": config,
        "history": [{"epoch": 1, "step": steps // 2, "train_loss": 1.5, "train_acc": 0.4,
                     "test_loss": 1.6, "test_acc": final_test_acc}],
    }
    optional = {"final_test_acc_precise_bn": final_test_acc_precise_bn,
                "lr_at_divergence": lr_at_divergence}
    metrics |= {key: value for key, value in optional.items() if value is not None}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "train.log").write_text("synthetic run\n")
    (run_dir / "checkpoint.pt").write_bytes(b"")
    scalars, histograms = synthetic_events(seed, steps, probes, diverged_step)
    write_events(run_dir, scalars, histograms, hist_bins=hist_bins)
    return {"metrics": metrics, **expected_numbers(scalars)}


def write_hydra(run_dir: Path, config: dict[str, Any], overrides: dict[str, Any]) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    composed = {
        "seed": config["seed"], "epochs": config["epochs"], "batch_size": config["batch_size"],
        "data": {"name": config["data"]},
        "model": {"name": config["model"], "dropout": config["dropout"]},
        "norm": {"name": config["norm"], "momentum": 0.1},
        "optim": {"name": config["optimizer"], "lr": config["lr"], "momentum": 0.9},
    }
    hydra = {"hydra": {
        "runtime": {"choices": {"norm": config["norm"], "optim": "sgd", "model": "cnn"}},
        "job": {"config": {"override_dirname": {"exclude_keys": EXCLUDE_KEYS}}},
    }}
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(composed))
    (hydra_dir / "overrides.yaml").write_text(
        yaml.safe_dump([f"{k}={v}" for k, v in overrides.items()]))
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra))


def synthetic_events(
    seed: int, steps: int, probes: bool, diverged_step: int | None = None
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, np.ndarray]]]]:
    """Scalars and histogram samples of a run, every 5 steps up to `steps`."""
    last = diverged_step if diverged_step is not None else steps
    points = list(range(0, last + 1, 5))
    scalars: dict[str, list[tuple[int, float]]] = {
        "train/loss": [(s, 2.0 / (1 + s)) for s in points],
        "grad/global_norm": [(s, 1.0 + seed + s / 10) for s in points if s != diverged_step],
    }
    if diverged_step is not None:
        scalars["grad/global_norm"].append((diverged_step, float("inf")))
    histograms: dict[str, list[tuple[int, np.ndarray]]] = {}
    if probes:
        rng = np.random.default_rng(seed)
        for depth, layer in enumerate(LAYERS):
            centre = [(s, depth + s / 100) for s in points]
            scalars[f"act/p50/{layer}"] = centre
            scalars[f"act/p15/{layer}"] = [(s, c - 1.0) for s, c in centre]
            scalars[f"act/p85/{layer}"] = [(s, c + 1.0) for s, c in centre]
            scalars[f"drift/w1/{layer}"] = [(s, 0.1 * (depth + 1) + seed) for s in points[1:]]
            scalars[f"ics/l2/{layer}"] = [(s, 0.5 * (depth + 1)) for s in points]
            scalars[f"ics/cos/{layer}"] = [(s, 0.9 - 0.1 * depth) for s in points]
            scalars[f"white/offdiag_corr/{layer}"] = [(s, 0.1 * depth + s / 1000 + seed / 100)
                                                      for s in points]
            scalars[f"white/erank_frac/{layer}"] = [(s, 1 - 0.1 * depth) for s in points]
            scalars[f"white/cond/{layer}"] = [(s, 10.0 ** (depth + 1)) for s in points]
            if layer in NORMS:
                scalars[f"bnstats/mean_shift/{layer}"] = [(s, (depth + s / 10) / 10 + seed)
                                                          for s in points]
                scalars[f"bnstats/log_var_ratio/{layer}"] = [(s, 0.05 * depth) for s in points]
            histograms[f"act/hist/{layer}"] = [
                (s, rng.normal(c, 1.0, 500)) for s, c in centre[::2]]
    return scalars, histograms


def expected_numbers(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float | None]:
    """What compare should compute from these scalars: peak finite gradient norm, the mean
    over layers of each layer's mean over steps, the last off-diagonal correlation of the
    deepest layer and the mean over norm layers of the last mean shift."""
    def layer_mean(prefix: str) -> float | None:
        means = [np.mean([v for _, v in pts]) for t, pts in scalars.items() if t.startswith(prefix)]
        return float(np.mean(means)) if means else None

    grads = [v for _, v in scalars.get("grad/global_norm", []) if np.isfinite(v)]
    white = scalars.get(f"white/offdiag_corr/{LAYERS[-1]}")
    shifts = [scalars[f"bnstats/mean_shift/{n}"][-1][1] for n in NORMS
              if f"bnstats/mean_shift/{n}" in scalars]
    return {"peak_grad_norm": max(grads) if grads else None, "drift_w1": layer_mean("drift/w1/"),
            "ics_l2": layer_mean("ics/l2/"), "ics_cos": layer_mean("ics/cos/"),
            "white_offdiag": white[-1][1] if white else None,
            "bnstats_mean_shift": float(np.mean(shifts)) if shifts else None}


def write_events(
    run_dir: Path,
    scalars: dict[str, list[tuple[int, float]]],
    histograms: dict[str, list[tuple[int, np.ndarray]]] | None = None,
    stamp: int = 1_700_000_000,
    purge_step: int | None = None,
    hist_bins: str | int = "tensorflow",
) -> Path:
    """One event file named as a writer started at unix time `stamp` would name it;
    `purge_step` as a writer resuming at that step sets it."""
    staging = run_dir / ".events-staging"  # the writer picks the name; we pick the stamp
    writer = SummaryWriter(log_dir=str(staging), purge_step=purge_step)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    for tag, samples in (histograms or {}).items():
        for step, values in samples:
            writer.add_histogram(tag, torch.as_tensor(values), step, bins=hist_bins)
    writer.close()
    (written,) = staging.iterdir()
    target = run_dir / f"events.out.tfevents.{stamp}.testhost.1.0"
    written.rename(target)
    staging.rmdir()
    return target


def write_sweep(root: Path, runs: Iterable[dict[str, Any]]) -> dict[Path, dict[str, Any]]:
    """A Hydra multirun dir: multirun.yaml and one job dir per run (`write_run` kwargs)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    written = {}
    for kwargs in runs:
        overrides = {"norm": kwargs.get("norm", "custom"), "optim.lr": kwargs.get("lr", 0.1),
                     "seed": kwargs.get("seed", 0)}
        run_dir = root / job_name(overrides)
        written[run_dir] = write_run(run_dir, **kwargs)
    return written
