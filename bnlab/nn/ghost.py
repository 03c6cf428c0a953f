r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, "Train longer, generalize better:
closing the generalization gap in large batch training of neural networks", NeurIPS 2017),
written from scratch.

In training mode the batch is cut along dim 0 into consecutive chunks ("virtual batches") of
``virtual_batch_size`` samples, and each chunk is batch-normalized with its own statistics::

    chunk k:  mu_k = mean of x over the chunk's samples and dims 2..
              var_k = biased variance over the same values
              y = (x - mu_k) / sqrt(var_k + eps) * gamma + beta

The small virtual batches keep BN's regularizing noise at the level of a small batch while the
optimizer sees a large one. Evaluation mode is batch norm's (running statistics).

Decisions (the paper leaves them open):

* **Uneven batches.** When ``N`` is not a multiple of ``virtual_batch_size`` the last chunk is
  smaller. A last chunk with a single value per channel (one sample and no spatial extent) has
  no variance: it is merged into the previous chunk, which then has one sample more. A whole
  batch of one value per channel raises batch norm's ``ValueError``. With
  ``virtual_batch_size >= N`` there is one chunk: the layer is batch norm.
* **Running statistics.** One update per training step (so ``momentum`` means what it means for
  batch norm), towards the pooled chunk statistics: the mean of the chunk means weighted by
  chunk size (= the batch mean) and the *pooled within-chunk variance*
  ``sum_k n_k var_k / (n - K)`` (``n_k`` values in chunk ``k``, ``K`` chunks, ``n`` values in
  all): the unbiased estimate of the variance each chunk is normalized with. With equal chunks
  it is the mean of the chunks' unbiased variances; with one chunk, batch norm's update.
* **No running statistics** (``track_running_stats=False``): eval mode also uses the chunked
  batch statistics, as batch norm uses batch statistics then.

The chunk statistics are per-(sample, channel) row sums pooled over a chunk's rows, computed by
the engine shared with group norm (:func:`bnlab.nn.groupnorm.pooled_row_norm`): vectorized over
all chunks (no Python loop per chunk), eager CPU passes in cache-sized slices of whole chunks
with ``fast`` (the default), plain differentiable ops with ``fast=False`` and under
``torch.compile``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.nn.batchnorm import batch_norm
from bnlab.nn.compat import check_eps, check_params, empty_batch_output, verify_batch_size
from bnlab.nn.functional import update_running_stats
from bnlab.nn.groupnorm import Pool, pooled_row_norm
from bnlab.nn.state import Input1d, Input2d, RunningStatsNorm
from bnlab.nn.stats import ChannelStatistics

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_batch_norm"]


def chunk_sizes(batch: int, virtual_batch_size: int, values_per_sample: int) -> list[int]:
    """Samples per chunk: consecutive chunks of ``virtual_batch_size``, the last one smaller if
    the batch does not divide, and merged into the previous one if it would hold a single value
    per channel (``values_per_sample`` = product of the dims after 1)."""
    count = max(1, -(-batch // virtual_batch_size))
    if count > 1 and (batch - (count - 1) * virtual_batch_size) * values_per_sample == 1:
        count -= 1
    return [virtual_batch_size] * (count - 1) + [batch - (count - 1) * virtual_batch_size]


def _chunk_pool(sizes: list[int]) -> Pool:
    """The pool of :func:`pooled_row_norm` for these chunks: per-(sample, channel) values
    averaged over the samples of their chunk."""

    def mean_per_chunk(t: Tensor, size: int) -> Tensor:
        chunks = t.reshape(-1, size, t.shape[1])
        return chunks.mean(1, keepdim=True).expand_as(chunks).reshape(t.shape)

    full, last = sizes[0], sizes[-1]
    if full == last:
        return lambda t: mean_per_chunk(t, full)
    split = sum(sizes[:-1])  # (only reached unsliced: align is the whole batch then)
    return lambda t: torch.cat([mean_per_chunk(t[:split], full), mean_per_chunk(t[split:], last)])


def ghost_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    virtual_batch_size: int = 32,
    *,
    fast: bool = True,
) -> Tensor:
    """Functional Ghost BN, with the arguments of :func:`bnlab.nn.batchnorm.batch_norm` plus
    ``virtual_batch_size``: chunked batch statistics if ``training`` (running statistics, if
    given, updated by the pooled rule of the module docstring), else batch norm's eval.
    ``fast``: eager calls take the fast paths of the row engine and of batch norm."""
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          fast=fast)
    verify_batch_size(input.size())
    check_eps(eps, training)
    if input.numel() == 0:
        return empty_batch_output(input, weight, bias)
    check_params(input, running_mean, running_var, weight, bias, training)

    length = input[0, 0].numel()
    sizes = chunk_sizes(input.shape[0], virtual_batch_size, length)
    # Slices of whole chunks when they are all equal; else one slice (the pool then splits).
    align = sizes[0] if sizes[0] == sizes[-1] else input.shape[0]
    y, row_mean, row_var = pooled_row_norm(input, _chunk_pool(sizes), weight, bias, eps, align,
                                           fast=fast)

    if running_mean is not None or running_var is not None:
        # Each chunk's statistics sit in the rows of its samples; take its first sample's.
        chunk_mean = row_mean[::virtual_batch_size][: len(sizes)]
        chunk_var = row_var[::virtual_batch_size][: len(sizes)]
        n = input.shape[0] * length
        dof = n - len(sizes)  # degrees of freedom of the pooled within-chunk variance
        values = torch.tensor(sizes, dtype=chunk_mean.dtype, device=chunk_mean.device) * length
        mean = (values / n) @ chunk_mean
        # update_running_stats stores var * m / (m - 1) for "a biased variance of m values";
        # with m = dof + 1 that is the pooled unbiased variance sum_k n_k var_k / dof.
        var = (values / (dof + 1)) @ chunk_var
        update_running_stats(running_mean, running_var, mean, var, dof + 1, momentum)
    return y


class _GhostBatchNorm(ChannelStatistics, RunningStatsNorm):
    """Shared base of :class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d`; its statistics
    (:class:`bnlab.nn.stats.ChannelStatistics`) are the whole batch's."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fast: bool = True,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 2
        ):
            raise ValueError(
                f"virtual_batch_size must be an int >= 2, got {virtual_batch_size!r}"
            )
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         fast=fast)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = self.momentum_factor()
        running_mean, running_var = self.buffers_for_call()
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                self.uses_batch_stats(), factor, self.eps,
                                self.virtual_batch_size, fast=self.fast)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


_DOC = r"""Ghost Batch Normalization (Hoffer et al., NeurIPS 2017) over a {shape} input, written
    from scratch (see :mod:`bnlab.nn.ghost` for the formulas and the rules chosen).

    Training mode: each consecutive chunk of ``virtual_batch_size`` samples is normalized with
    its own mean and biased variance, then :math:`\gamma, \beta`; one running-statistics update
    per step from the pooled chunk statistics. Eval mode is batch norm's. With
    ``virtual_batch_size`` >= the batch size it is :class:`{bn}`.

    Same parameters and buffers as :class:`torch.nn.{bn}`: state dicts load into each other.

    Args:
        num_features: number of channels :math:`C`
        virtual_batch_size: samples per chunk, an int >= 2. Default: 32
        eps: added to the variances. Default: 1e-5
        momentum: running-statistics factor; ``None``: cumulative average. Default: 0.1
        affine: learnable ``weight`` and ``bias``. Default: True
        track_running_stats: keep running statistics (else eval mode uses the chunks' own
            statistics too). Default: True
        device, dtype: factory arguments for the parameters and buffers.
        fast: (keyword-only) eager calls take the fast paths; ``False``: the reference code.
            Default: True

    Shape:
        - Input: {dims}
        - Output: same shape as input
"""


class GhostBatchNorm1d(Input1d, _GhostBatchNorm):
    __doc__ = _DOC.format(shape="2D or 3D", bn="BatchNorm1d", dims=r":math:`(N, C)` or "
                          r":math:`(N, C, L)`")


class GhostBatchNorm2d(Input2d, _GhostBatchNorm):
    __doc__ = _DOC.format(shape="4D", bn="BatchNorm2d", dims=r":math:`(N, C, H, W)`")
