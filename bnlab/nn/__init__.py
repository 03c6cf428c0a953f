"""Normalization layers written from scratch, and model-wide conversion.

What lives where:

* ``functional.py``: the shared pieces every layer is built from (per-channel batch statistics
  and the unbiased correction, the one place that defines them; normalize, affine,
  running-statistics update), plain differentiable tensor ops.
* ``state.py``: torch's batch-norm module state (parameters, buffers, options, state-dict
  versioning), apart from any math.
* ``stats.py``: the statistics interface, how a layer reports the batch and running statistics
  it normalizes with and loads population ones (used by ``bnstats/`` and Precise BN).
* ``batchnorm.py``: :class:`BatchNorm1d`/``2d``/``3d``, the reference a reader learns BN from:
  drop-in replacements for torch's layers with the hand-derived backward;
  ``batchnorm_fast.py`` is its eager CPU fast path (tested against it, taken when a layer's
  ``fast`` option is on), ``passes.py`` the cache-sized slicing and layout-aware passes the
  fast paths share, and ``compat.py`` torch's dtype and memory-format rules.
* The zoo: :class:`BatchRenorm1d`/``2d`` (``renorm.py``, Ioffe 2017),
  :class:`GhostBatchNorm1d`/``2d`` (``ghost.py``, Hoffer et al. 2017), :class:`GroupNorm`
  (``groupnorm.py``, Wu & He 2018; layer norm is one group),
  :class:`DecorrelatedBatchNorm1d`/``2d`` (``decorrelated.py``: ZCA whitening, Huang et al.
  2018, and IterNorm, Huang et al. 2019; its matrix functions in ``whitening.py``).
* The norm-free alternatives (no mean subtracted, normalization and activation in one):
  :class:`FilterResponseNorm` (``frn.py``, FRN + TLU, Singh & Krishnan 2020),
  :class:`EvoNormB0` and :class:`EvoNormS0` (``evonorm.py``, Liu et al. 2020).
* :class:`SyncBatchNorm` (``syncbn.py``): batch norm with the statistics of the whole batch
  that the processes of a data-parallel job hold together (torch.distributed; CPU and GPU).
* :class:`NoisyBatchNorm1d`/``2d`` (``noisy.py``): the custom BN followed by the
  time-varying noise of Santurkar et al. (2018), Sec. 2.1, in training mode.
* :func:`convert_batchnorm`, :func:`replace_batchnorm` (``convert.py``): swap every batch-norm
  layer of a model between torch's and ours, or replace it by any layer of the zoo.
* :class:`WSConv2d`, :class:`ScaledWSConv2d` (``weight_std.py``): conv layers with weight
  standardization (Qiao et al. 2019) and Scaled WS (Brock et al. 2021).
* :class:`MaxPool2d` (``pooling.py``): torch's layer, keeping ATen's kernels under
  ``torch.compile`` on CPU.

Every layer with a fast path takes ``fast: bool = True``: its ``forward`` passes it to the
one place that picks the implementation (eager: the fast path; ``fast=False`` or
``torch.compile``: the reference).
"""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import convert_batchnorm, replace_batchnorm
from bnlab.nn.decorrelated import DecorrelatedBatchNorm1d, DecorrelatedBatchNorm2d
from bnlab.nn.evonorm import EvoNormB0, EvoNormS0
from bnlab.nn.frn import FilterResponseNorm
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.groupnorm import GroupNorm
from bnlab.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d
from bnlab.nn.pooling import MaxPool2d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d
from bnlab.nn.syncbn import SyncBatchNorm
from bnlab.nn.weight_std import ScaledWSConv2d, WSConv2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "DecorrelatedBatchNorm1d",
    "DecorrelatedBatchNorm2d",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "MaxPool2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "ScaledWSConv2d",
    "SyncBatchNorm",
    "WSConv2d",
    "convert_batchnorm",
    "replace_batchnorm",
]
