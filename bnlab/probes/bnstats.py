r"""How far a norm layer's running statistics are from the batch statistics it trains with.

In training a BN layer normalizes with the batch's statistics; in evaluation with its running
statistics. The gap between the two is what evaluation pays for (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm"; Precise BN closes it, see ``bnlab.precise_bn``). Measured on the fixed
probe batch in the shared probe forward (``forward.probe_forward``: train mode, read-only,
seeded), from each norm layer's input just before the layer runs (a pre-hook, so the running
statistics are read before the forward updates them; ``read_only`` puts them back after).

Every layer with running statistics is measured (``torch.nn.BatchNorm*``, bnlab's BN, noisy BN,
Batch Renorm, Ghost BN, decorrelated BN, EvoNorm B0), whatever ``probe.layers`` watches; layers
without (``track_running_stats=False``, Group Norm, FRN, EvoNorm S0, an empty slot) have no
tags. Each layer says what
it normalizes with through the statistics interface (``bnlab.nn.stats``): its batch statistics
for the probe batch, as a training forward would compute them, and its running statistics;
nothing here knows a layer type. Per channel c, over all values of the channel in the probe
batch (samples and positions): batch mean μ_B and biased variance σ²_B (the ones BN normalizes
with in training); the running mean μ_run and variance σ²_run; the layer's ``eps``. The formulas
are evaluated in float64:

- ``bnstats/mean_shift/<norm>``    = mean_c |μ_B − μ_run| / sqrt(σ²_run + eps), the batch mean's
  offset from the running mean in units of the running std (eval's normalization);
- ``bnstats/log_var_ratio/<norm>`` = mean_c |log((σ²_B + eps) / (σ²_run + eps))|, 0 when the
  batch has the running variance; log 2 ≈ 0.69 means a factor of 2 either way.

Ghost BN normalizes each virtual batch with its own statistics; its virtual batches' means
average to the whole batch's mean, so here its μ_B, σ²_B are those of the whole probe batch:
the tags measure the running statistics' lag, not the ghost batches' sampling noise.

A layer whose statistics are a whitening (decorrelated BN, IterNorm: the batch's (μ_B, W_B) as
training uses them and the running W_run):

- ``bnstats/mean_shift/<norm>`` as above, with σ²_run + eps = diag((W_runᵀ W_run)⁻¹), the
  running covariance the whitening undoes (``NormStatistics.variance_plus_eps``);
- ``bnstats/whitening_dist/<norm>`` = ‖W_B − W_run‖_F / ‖W_run‖_F.

A layer without a mean statistic (it subtracts none: EvoNorm B0) has no ``mean_shift``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.nn.stats import batch_statistics_layers, statistics_of
from bnlab.probes.base import Column, Interval, Measurements, Panel, Probe, Setup, every
from bnlab.registry import Schema


def has_running_stats(module: nn.Module) -> bool:
    """Whether ``module`` has batch statistics and keeps running ones for evaluation."""
    stats = statistics_of(module)
    return stats is not None and stats.running_statistics() is not None


def running_stats_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers with running statistics, by module path, in module order."""
    return batch_statistics_layers(model, running=True)


def _mean_shift(mean: Tensor, run_mean: Tensor, run_var_eps: Tensor) -> Tensor:
    return ((mean - run_mean).abs() / run_var_eps.sqrt()).mean()


def stats_mismatch(layer: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """The ``bnstats/`` measures (without the prefix and layer) of ``layer`` for its input ``x``
    (0-d float64 tensors, no host sync)."""
    stats = statistics_of(layer)
    running = None if stats is None else stats.running_statistics()
    if stats is None or running is None:
        raise ValueError(f"{type(layer).__name__} keeps no running statistics to compare")
    batch = stats.batch_statistics(x.detach())
    run_var_eps = running.variance_plus_eps()
    measures = {}
    if batch.mean is not None and running.mean is not None:
        measures["mean_shift"] = _mean_shift(batch.mean.double(), running.mean.double(),
                                             run_var_eps)
    if running.whitening is not None and batch.whitening is not None:
        w_run, w_batch = running.whitening.double(), batch.whitening.double()
        measures["whitening_dist"] = (torch.linalg.matrix_norm(w_batch - w_run)
                                      / torch.linalg.matrix_norm(w_run))
    else:
        measures["log_var_ratio"] = torch.log(batch.variance_plus_eps() / run_var_eps).abs().mean()
    return measures


class StatsMismatchProbe(Probe):
    """Records the ``bnstats/`` measures of every layer with running statistics in the probe
    forward."""

    name = "bnstats"
    runs = ("probe_batch",)

    class Keys(Schema):
        bnstats_every: Interval = every(500, "mismatch of each norm layer's batch vs running "
                                        "statistics")

    tags: ClassVar[dict[str, str]] = {
        "bnstats/mean_shift/<norm>": "mean_c |μ_B − μ_run| / √(σ²_run + eps): the probe batch's "
                                     "mean (train mode) against the running mean, per norm "
                                     "layer with running statistics (a layer without a mean, "
                                     "such as EvoNorm B0, has none)",
        "bnstats/log_var_ratio/<norm>": "mean_c |log((σ²_B + eps) / (σ²_run + eps))|",
        "bnstats/whitening_dist/<norm>": "decorrelated BN, instead of the variance ratio: "
                                         "‖W_B − W_run‖_F / ‖W_run‖_F",
    }
    columns = (Column("bnstats_mean_shift", "final BN mean shift", "bnstats/mean_shift/",
                      steps="last", optional=True),)
    panels = (Panel("bnstats/mean_shift/", "batch vs running stats:\nmean shift (running stds)"),
              Panel("bnstats/log_var_ratio/", "batch vs running stats:\n|log variance ratio|"),
              Panel("bnstats/whitening_dist/",
                    "batch vs running\nwhitening (rel. Frobenius)"))

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.layers = running_stats_layers(setup.model)
        self.captured: dict[str, Tensor] = {}

    def due(self, step: int) -> bool:
        return bool(self.layers) and super().due(step)

    def attach(self) -> list[RemovableHandle]:
        def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
            def pre_hook(module: nn.Module, args: tuple) -> None:
                # before the layer runs: its forward updates the running statistics
                for measure, value in stats_mismatch(module, args[0]).items():
                    self.captured[f"bnstats/{measure}/{name}"] = value
            return pre_hook

        return [m.register_forward_pre_hook(hook_for(n)) for n, m in self.layers.items()]

    def measure(self, step: int) -> Measurements:
        captured, self.captured = self.captured, {}
        return Measurements(captured)
