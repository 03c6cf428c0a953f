r"""The measures of signal propagation and scale invariance, as plain functions of tensors.

Each takes what a hook or an optimizer step hands it and returns 0-d tensors (no host sync);
the signal command (:mod:`bnlab.signal.collect`) and the ``gram/`` and ``scale/`` probes call
the same functions, so a number means the same wherever it is logged.

**Channel moments** (Brock et al. 2021, Fig. 1, "Signal Propagation Plots"). For an activation
``x`` of shape (N, C, ...), per channel c over its N·H·W values: the mean μ_c and the biased
variance σ²_c (``bnlab.nn.functional.batch_stats``, two-pass), then

- ``mean_sq`` = mean_c μ_c², the average channel squared mean;
- ``var``     = mean_c σ²_c, the average channel variance.

**The sample Gram matrix** (Daneshmand et al. 2020; Lubana et al. 2021). Samples, not channels:
row i of X ∈ R^{N×D} is sample i's whole representation, flattened (D = C·H·W), and
x̂_i = x_i / ‖x_i‖ (a zero row stays zero: it has no direction). G = X̂ X̂ᵀ is the N×N matrix of
cosine similarities, in float64, with eigenvalues λ_1 ≥ … ≥ λ_N ≥ 0 (clipped at 0: rounding can
leave a singular G's smallest ones slightly negative). From it:

- ``cos_sim``     = Σ_{i≠j} G_ij / (N(N − 1)), the mean cosine similarity of two different
  samples: 0 for orthogonal representations, 1 when all samples point the same way;
- ``stable_rank`` = ‖G‖_F² / ‖G‖₂² = Σ λ_i² / λ_1², between 1 (one direction) and N
  (orthonormal samples). (Lubana et al.'s code reports tr G / ‖G‖₂ = Σ λ_i / λ_1, the stable
  rank of X̂ rather than of G; both are 1 at collapse and N for orthonormal samples.);
- ``erank``       = exp(−Σ p_i log p_i), p_i = λ_i / Σ λ_j, the effective rank (Roy &
  Vetterli 2007), between 1 and N.

All three are NaN when X holds a non-finite value or every row is zero.

**Scale invariance** (van Laarhoven 2017; Li & Arora 2020; Wan et al. 2021). A weight w whose
output feeds a batch-statistics norm gives the same network for every c·w, c > 0; SGD then moves
it with the effective learning rate η/‖w‖². The angle it turns in one step, from w to w′, is

    angle(w, w′) = 2·atan2(‖ŵ − ŵ′‖, ‖ŵ + ŵ′‖),  ŵ = w / ‖w‖,

which equals arccos(⟨ŵ, ŵ′⟩) but keeps full precision for the small angles of one step (arccos
is flat near 1). Under SGD with heavy-ball momentum α, weight decay λ and learning rate η, the
angular update per step tends to the equilibrium √(2ηλ / (1 + α)) (Wan et al. 2021).

The fit of gradient norms against depth (Yang et al. 2019) is
:func:`bnlab.signal.report.loglinear_fit`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bnlab.nn.functional import batch_stats

__all__ = [
    "GRAM_MEASURES",
    "angle",
    "channel_moments",
    "equilibrium_angle",
    "gram_measures",
    "sample_gram",
]

GRAM_MEASURES = ("cos_sim", "stable_rank", "erank")


def channel_moments(x: Tensor) -> dict[str, Tensor]:
    """``mean_sq`` (mean_c μ_c²) and ``var`` (mean_c σ²_c) of an (N, C, ...) activation, in
    float64."""
    mean, var = batch_stats(x.detach())
    return {"mean_sq": mean.double().square().mean(), "var": var.double().mean()}


def _flat_samples(x: Tensor) -> Tensor:
    """(N, D) rows of ``x``'s samples, their values in memory order: a view for contiguous and
    channels-last tensors. G does not depend on the order of a row's values."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)
    return x.reshape(len(x), -1)


def sample_gram(x: Tensor, samples: int | None = None) -> Tensor:
    """G = X̂ X̂ᵀ in float64 for the first ``samples`` samples of ``x`` (all when None): the
    cosine similarity of every pair of samples' flattened representations."""
    rows = _flat_samples(x.detach()[:samples])
    if rows.device.type == "mps":  # no float64 on MPS
        rows = rows.cpu()
    rows = rows.double()
    raw = rows @ rows.T  # ⟨x_i, x_j⟩; normalizing the N×N result spares a pass over X
    norms = raw.diagonal().sqrt()
    inverse = torch.where(norms > 0, 1 / norms, 0.0)  # a zero row stays zero
    return raw * inverse[:, None] * inverse[None, :]


def gram_measures(gram: Tensor) -> dict[str, Tensor]:
    """``cos_sim``, ``stable_rank`` and ``erank`` of a sample Gram matrix (0-d float64)."""
    n = gram.shape[0]
    finite = gram.isfinite().all()
    # eigvalsh fails on NaN; a finite stand-in keeps it going, and the result is NaN anyway
    gram = torch.where(finite, gram, torch.eye(n, dtype=gram.dtype, device=gram.device))
    off_diagonal = gram.sum() - gram.diagonal().sum()
    cos_sim = off_diagonal / (n * (n - 1)) if n > 1 else torch.full_like(off_diagonal, math.nan)
    eig = torch.linalg.eigvalsh(gram).clamp(min=0)
    top = eig[-1]
    stable_rank = eig.square().sum() / top.square()  # 0/0 = NaN when G = 0
    p = eig / eig.sum()
    erank = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: 0·log 0 = 0
    nan = torch.full((), math.nan, dtype=gram.dtype, device=gram.device)
    measures = {"cos_sim": cos_sim, "stable_rank": stable_rank, "erank": erank}
    return {k: torch.where(finite, v, nan) for k, v in measures.items()}


def angle(before: Tensor, after: Tensor) -> Tensor:
    """The angle in radians between two weight tensors (as flat vectors), in float64; NaN if
    either is zero or non-finite."""
    u, v = before.detach().reshape(-1).double(), after.detach().reshape(-1).double()
    u_hat = u / torch.linalg.vector_norm(u)
    v_hat = v / torch.linalg.vector_norm(v)
    return 2 * torch.atan2(torch.linalg.vector_norm(u_hat - v_hat),
                           torch.linalg.vector_norm(u_hat + v_hat))


def equilibrium_angle(lr: float, weight_decay: float, momentum: float) -> float:
    """√(2ηλ / (1 + α)): the angular update per step of a scale-invariant weight at equilibrium
    under SGD with heavy-ball momentum α and weight decay λ (Wan et al. 2021)."""
    return math.sqrt(2 * lr * weight_decay / (1 + momentum))
