"""Distributions of the watched activations on the fixed probe batch, and their drift.

The activations are those of the shared probe forward (``forward.probe_forward``: **train
mode**, BN normalizing with the probe batch's own statistics, which is what the next layer sees
during training; read-only; under a seeded RNG): with ``probe.act_seed=fixed`` every probe draws
the same dropout masks and BN noise, so drift shows only what the weight updates did; with
``step`` the seed is PROBE_SEED + step, a new draw at every probe as at every training step, so
drift also shows the shift that noise injects (noisy BN, dropout), and a resumed run still
repeats it. Statistics are taken inside forward hooks, before an in-place ReLU overwrites the
tensor.

Per layer, over all values of the activation: percentiles ``act/p15|p50|p85`` (linear
interpolation, as ``torch.quantile`` and ``numpy.percentile``), ``act/mean`` and ``act/std``
(population std). Per channel c (dim 1) over the other dims: mean μ_c and population std σ_c.

Drift of the current probe against a reference probe (′), the previous one (``drift/*``) or the
first one, at step 0 (``drift/*_init``):

- ``mean_shift`` = mean_c |μ_c − μ′_c| / σ′_c: channel means moved, in reference stds;
- ``std_ratio``  = mean_c σ_c / σ′_c: 1 when the channel scales are unchanged;
- ``w1`` (previous only) = W1(a, a′) / std(a′), the 1-D Wasserstein distance between the
  layer's current and previous values, in units of the previous std, so layers are comparable.
  a and a′ are the values at a fixed random index set of ``hist_samples`` positions; W1 between
  equal-size samples is mean |sort(a) − sort(a′)|.

Channels whose reference σ′_c is 0 (constant, e.g. dead) are left out of the channel means, as
their ratios are undefined; a metric with nothing left, or non-finite inputs, is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.nn.functional import batch_stats
from bnlab.probes.base import Column, Interval, Measurements, Panel, Probe, Setup, every
from bnlab.probes.readonly import PROBE_SEED
from bnlab.registry import Schema

QUANTILES = (0.15, 0.5, 0.85)


def _order_statistics(values: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """The values of the given 0-based ``ranks`` (sorted), partitioning ``values`` in place one
    rank at a time on ever smaller slices: ~6× faster than numpy's multi-rank partition and
    far faster than a full sort of a large activation."""
    if not ranks:
        return {}
    mid = ranks[len(ranks) // 2]
    values.partition(mid)
    found = {mid: float(values[mid])}
    found.update(_order_statistics(values[:mid], [r for r in ranks if r < mid]))
    right = _order_statistics(values[mid + 1:], [r - mid - 1 for r in ranks if r > mid])
    found.update({r + mid + 1: v for r, v in right.items()})
    return found


def _ranked(flat: Tensor, ranks: list[int]) -> Tensor:
    """The values of the given 0-based ranks among ``flat``."""
    if flat.device.type != "cpu":
        return flat.sort().values[ranks]  # a sort is fast on an accelerator
    found = _order_statistics(flat.numpy().copy(), sorted(set(ranks)))
    return torch.tensor([found[r] for r in ranks])


def percentiles(x: Tensor, qs: tuple[float, ...] = QUANTILES,
                has_nan: Tensor | None = None) -> Tensor:
    """The ``qs`` quantiles of all values of ``x`` with linear interpolation, as
    ``torch.quantile`` (without its 2^24-element limit); all NaN if ``x`` holds a NaN
    (``has_nan``, when the caller knows it already, saves a pass over ``x``)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pos = [q * (n - 1) for q in qs]
    lo = [math.floor(p) for p in pos]
    hi = [min(i + 1, n - 1) for i in lo]
    ranked = _ranked(flat, lo + hi)
    weight = torch.tensor([p - i for p, i in zip(pos, lo, strict=True)], device=flat.device)
    values = torch.lerp(ranked[:len(qs)], ranked[len(qs):], weight)
    if has_nan is None:
        has_nan = flat.isnan().any()
    return torch.where(has_nan, math.nan, values)


@dataclass
class LayerStats:
    """What one probe forward records of one watched activation."""

    quantiles: Tensor  # (len(QUANTILES),)
    mean: Tensor       # 0-d, over all values
    std: Tensor        # 0-d, population std over all values
    chan_mean: Tensor  # (C,)
    chan_std: Tensor   # (C,)
    sample: Tensor     # (hist_samples,) or all values if fewer: at a fixed index set


def layer_stats(x: Tensor, index: Tensor | None) -> LayerStats:
    """Statistics of one activation (N, C, ...); ``index`` picks the sample (None: all)."""
    x = x.detach().float()
    chan_mean, chan_var = batch_stats(x)  # per channel, as the norm layers compute them
    chan_std = chan_var.sqrt()
    # every channel holds the same number of values, so the layer's mean and variance follow
    # from the channels' (law of total variance) without another pass over x
    mean = chan_mean.mean()
    std = (chan_std.square().mean() + (chan_mean - mean).square().mean()).sqrt()
    flat = x.reshape(-1)
    sample = flat.clone() if index is None else flat[index]  # a copy: ReLU may run in place
    # a NaN makes its channel's mean NaN (so does +inf meeting -inf: NaN is reported then too)
    quantiles = percentiles(x, has_nan=chan_mean.isnan().any())
    return LayerStats(quantiles, mean, std, chan_mean, chan_std, sample)


def _channel_mean(values: Tensor, ref_std: Tensor) -> Tensor:
    valid = ref_std > 0
    return torch.where(valid, values, 0.0).sum() / valid.sum()


def mean_shift(chan_mean: Tensor, ref_mean: Tensor, ref_std: Tensor) -> Tensor:
    """mean_c |μ_c − μ′_c| / σ′_c over channels with σ′_c > 0."""
    return _channel_mean((chan_mean - ref_mean).abs() / ref_std, ref_std)


def std_ratio(chan_std: Tensor, ref_std: Tensor) -> Tensor:
    """mean_c σ_c / σ′_c over channels with σ′_c > 0."""
    return _channel_mean(chan_std / ref_std, ref_std)


def wasserstein1(sample: Tensor, ref_sorted: Tensor, ref_std: Tensor) -> Tensor:
    """W1 between two equal-size samples (the reference already sorted), over ``ref_std``."""
    return (sample.sort().values - ref_sorted).abs().mean() / ref_std


class ActivationProbe(Probe):
    """Records the watched activations in the probe forward; keeps the first and the previous
    probe's statistics as drift references (these survive a checkpoint via ``state_dict``)."""

    name = "act"
    runs = ("probe_batch",)

    class Keys(Schema):
        act_every: Interval = every(100, "percentiles, mean, std and drift of each watched "
                                    "activation")
        hist_every: Interval = every(500, "activation histograms (0 or a multiple of "
                                     "act_every)")
        hist_samples: int = Field(8192, ge=1, description="values per histogram and per W1 "
                                  "sample, at a fixed index set: >= 1")

        @model_validator(mode="after")
        def _histograms_of_the_activation_forward(self) -> Self:
            if self.hist_every and (not self.act_every or self.hist_every % self.act_every):
                raise ValueError(f"hist_every={self.hist_every} must be 0 or a multiple of "
                                 f"act_every={self.act_every}")
            return self

    tags: ClassVar[dict[str, str]] = {
        "act/p15/<layer>": "15th percentile of the activation's values on the probe batch",
        "act/p50/<layer>": "median of the activation's values",
        "act/p85/<layer>": "85th percentile of the activation's values",
        "act/mean/<layer>": "mean of the activation's values",
        "act/std/<layer>": "population std of the activation's values",
        "act/hist/<layer>": "histogram of hist_samples values at a fixed index set (every "
                            "hist_every steps)",
        "drift/mean_shift/<layer>": "mean over channels of |μ_c − μ′_c| / σ′_c, against the "
                                    "previous probe",
        "drift/std_ratio/<layer>": "mean over channels of σ_c / σ′_c, against the previous probe",
        "drift/mean_shift_init/<layer>": "as drift/mean_shift, against step 0",
        "drift/std_ratio_init/<layer>": "as drift/std_ratio, against step 0",
        "drift/w1/<layer>": "1-D Wasserstein distance to the previous probe's values, over "
                            "their std",
    }
    columns = (Column("drift_w1", "act drift W1", "drift/w1/", steps="mean"),)
    panels = (Panel("drift/w1/", "activation drift\n(W1 to previous probe)"),)

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.hist_every, self.samples = cfg.hist_every, cfg.hist_samples
        self.device = setup.probe_inputs.device
        self.modules = {name: setup.model.get_submodule(name) for name in setup.watched}
        self.index: dict[str, Tensor | None] = {}
        self.init: dict[str, dict[str, Tensor]] = {}
        self.prev: dict[str, dict[str, Tensor]] = {}
        self.captured: dict[str, LayerStats] = {}

    def _index(self, name: str, numel: int, device: torch.device) -> Tensor | None:
        """A fixed random index set per layer, the same at every probe and after a resume."""
        if name not in self.index:
            if numel <= self.samples:
                self.index[name] = None
            else:
                seed = PROBE_SEED + list(self.modules).index(name)
                gen = torch.Generator().manual_seed(seed)
                self.index[name] = torch.randint(numel, (self.samples,), generator=gen).to(device)
        return self.index[name]

    def attach(self) -> list[RemovableHandle]:
        """Hooks that record each watched layer's statistics into ``captured``."""
        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                self.captured[name] = layer_stats(output, self._index(name, output.numel(),
                                                                      output.device))
            return hook

        return [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]

    def measure(self, step: int) -> Measurements:
        """Scalars (percentiles, mean, std, drift) and, every ``hist_every`` steps, histogram
        samples, of the forward just observed."""
        histograms = self.hist_every > 0 and step % self.hist_every == 0
        scalars: dict[str, Tensor | float] = {}
        hists: dict[str, Tensor] = {}
        captured, self.captured = self.captured, {}
        for name, s in captured.items():
            for q, value in zip(QUANTILES, s.quantiles.unbind(), strict=True):
                scalars[f"act/p{round(q * 100)}/{name}"] = value
            scalars[f"act/mean/{name}"] = s.mean
            scalars[f"act/std/{name}"] = s.std
            if name in self.prev:
                scalars.update(self._drift(name, s))
            if histograms:
                hists[f"act/hist/{name}"] = s.sample
            ref = {"mean": s.chan_mean, "std": s.chan_std}
            self.prev[name] = {**ref, "sorted": s.sample.sort().values, "overall_std": s.std}
            self.init.setdefault(name, ref)
        return Measurements(scalars, hists)

    def _drift(self, name: str, s: LayerStats) -> dict[str, Tensor]:
        prev, init = self.prev[name], self.init[name]
        drift = {
            f"drift/mean_shift/{name}": mean_shift(s.chan_mean, prev["mean"], prev["std"]),
            f"drift/std_ratio/{name}": std_ratio(s.chan_std, prev["std"]),
            f"drift/mean_shift_init/{name}": mean_shift(s.chan_mean, init["mean"], init["std"]),
            f"drift/std_ratio_init/{name}": std_ratio(s.chan_std, init["std"]),
        }
        if prev["sorted"].shape == s.sample.shape:  # else resumed with another sample size
            drift[f"drift/w1/{name}"] = wasserstein1(s.sample, prev["sorted"],
                                                     prev["overall_std"])
        return drift

    def state_dict(self) -> dict:
        return {"init": self.init, "prev": self.prev}

    def load_state_dict(self, state: dict) -> None:
        device = self.device
        self.init = {n: {k: v.to(device) for k, v in d.items()} for n, d in state["init"].items()}
        self.prev = {n: {k: v.to(device) for k, v in d.items()} for n, d in state["prev"].items()}
