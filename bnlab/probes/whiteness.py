r"""How white the watched activations are: correlation, conditioning and effective rank of their
channel covariance on the fixed probe batch.

BN standardizes each channel but leaves channels correlated; whitening (decorrelated BN) also
removes the correlations. These numbers show how far each watched position is from white.
They are taken in the shared probe forward (``forward.probe_forward``, the activation probe's
forward: train mode, read-only, seeded), at the same watched positions, so they cost no
forward of their own.

For an activation with C channels (dim 1), the channel covariance is taken over the M = N·H·W
values of each channel (M = N for a linear slot's (N, C)), in float64:
Σ = 1/M Σ_m (x_m − μ)(x_m − μ)ᵀ, with eigenvalues λ_1 ≤ … ≤ λ_C (clipped at 0 from below:
rounding can leave a singular Σ's smallest ones slightly negative).

- ``white/offdiag_corr/<layer>`` = mean over channel pairs i ≠ j of |ρ_ij|,
  ρ_ij = Σ_ij / sqrt(Σ_ii Σ_jj): 0 for white (or merely uncorrelated) channels, 1 when all
  channels are copies of one up to scale. Channels with zero variance (constant over the
  batch, e.g. a dead unit) are left out: their correlation is undefined. NaN if fewer than
  two channels vary.
- ``white/cond/<layer>`` = λ_C / max(λ_1, λ_C / COND_CEILING): the condition number, 1 for
  white channels. A singular Σ (a dead channel; more channels than the layer's fan-in, as
  the first conv's 27-value patches feeding 32 channels; a linear slot with no more probe
  samples than channels, ``probe.batch_size`` ≤ C) has λ_1 = 0 up to rounding, and its
  condition number is reported as the ceiling, 1e12 (the float32 activations' own rounding
  puts spurious eigenvalues near 1e-15·λ_C, far below it, so the ceiling reads "singular").
- ``white/erank/<layer>`` = exp(−Σ_i p_i log p_i), p_i = λ_i / Σ_j λ_j: the effective rank
  of Σ (Roy & Vetterli 2007), between 1 (one direction holds all variance) and C (all
  eigenvalues equal, e.g. white); a direction of zero variance adds nothing.
- ``white/erank_frac/<layer>`` = erank / C, comparable across layers of different widths.

Every measure is NaN when the activation holds a non-finite value, and when all channels are
constant (Σ = 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.probes.base import Column, Interval, Measurements, Panel, Probe, Setup, every
from bnlab.registry import Schema

COND_CEILING = 1e12  # the condition number reported for a singular covariance


def channel_covariance(x: Tensor) -> Tensor:
    """The (C, C) population covariance in float64 of the channels (dim 1) of ``x``, each over
    all its values (samples and positions)."""
    if x.device.type == "mps":  # no float64 on MPS
        x = x.cpu()
    centred = x.detach().double()
    centred -= centred.mean([d for d in range(x.dim()) if d != 1], keepdim=True)
    # (batch, C, values) blocks whose Gram matrices add up to the covariance's: an (N, C, H, W)
    # activation's samples are such blocks as they lie in memory (no transposed copy, and a
    # third less time than one (C, N·H·W) product on CPU); an (N, C) one is one block.
    blocks = centred.T[None] if x.dim() == 2 else centred.flatten(2)
    return torch.bmm(blocks, blocks.mT).sum(0) / (x.numel() // x.shape[1])


def whiteness(cov: Tensor) -> dict[str, Tensor]:
    """``offdiag_corr``, ``cond``, ``erank`` and ``erank_frac`` of a covariance matrix (0-d
    tensors, no host sync)."""
    c = cov.shape[0]
    finite = cov.isfinite().all()
    # eigvalsh fails on NaN; a finite stand-in keeps it going, and the result is NaN anyway
    cov = torch.where(finite, cov, torch.eye(c, dtype=cov.dtype, device=cov.device))
    var = cov.diagonal()
    live = var > 0
    inv_std = torch.where(live, var.rsqrt(), 0.0)
    corr = cov * inv_std[:, None] * inv_std[None, :]
    pairs = live[:, None] & live[None, :] & ~torch.eye(c, dtype=torch.bool, device=cov.device)
    offdiag = (corr.abs() * pairs).sum() / pairs.sum()  # 0/0 = NaN with < 2 live channels
    eig = torch.linalg.eigvalsh(cov).clamp(min=0)
    top = eig[-1]
    cond = top / torch.maximum(eig[0], top / COND_CEILING)  # 0/0 = NaN when Σ = 0
    p = eig / eig.sum()
    erank = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0·log 0 = 0
    nan = torch.full((), torch.nan, dtype=cov.dtype, device=cov.device)
    measures = {"offdiag_corr": offdiag, "cond": cond, "erank": erank, "erank_frac": erank / c}
    return {k: torch.where(finite, v, nan) for k, v in measures.items()}


class WhitenessProbe(Probe):
    """Records the channel covariance of each watched layer in the probe forward; ``measure``
    turns them into the ``white/`` scalars."""

    name = "white"
    runs = ("probe_batch",)

    class Keys(Schema):
        white_every: Interval = every(500, "whiteness: off-diagonal correlation, condition "
                                      "number, effective rank of each watched activation's "
                                      "channel covariance")

    tags: ClassVar[dict[str, str]] = {
        "white/offdiag_corr/<layer>": "mean |correlation| between channels (constant channels "
                                      "left out)",
        "white/cond/<layer>": "λ_max/λ_min of the channel covariance; a singular one reads 1e12",
        "white/erank/<layer>": "effective rank of the channel covariance (Roy & Vetterli 2007)",
        "white/erank_frac/<layer>": "effective rank over the number of channels",
    }
    columns = (Column("white_offdiag", "final off-diag corr (deepest)", "white/offdiag_corr/",
                      steps="last", modules="deepest", optional=True),)
    panels = (Panel("white/offdiag_corr/", "whiteness: mean\n|off-diag correlation|"),
              Panel("white/erank_frac/", "whiteness: effective\nrank / channels"),
              Panel("white/cond/", "whiteness: condition\nnumber (log)", log=True))

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.modules = {name: setup.model.get_submodule(name) for name in setup.watched}
        self.captured: dict[str, Tensor] = {}

    def attach(self) -> list[RemovableHandle]:
        def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                # inside the hook: an in-place ReLU overwrites the output right after
                self.captured[name] = channel_covariance(output)
            return hook

        return [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]

    def measure(self, step: int) -> Measurements:
        captured, self.captured = self.captured, {}
        return Measurements({f"white/{measure}/{name}": value for name, cov in captured.items()
                             for measure, value in whiteness(cov).items()})
