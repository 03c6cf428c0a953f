"""From-scratch batch normalization layers, noisy BN and model-wide conversion.

* :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: drop-in replacements for
  torch's layers with the math (forward and hand-derived backward) written out in Python.
* :class:`NoisyBatchNorm1d`, :class:`NoisyBatchNorm2d`: the custom BN followed by the
  time-varying noise of Santurkar et al. (2018), Sec. 2.1, in training mode.
* :func:`convert_batchnorm`: swap every batch-norm layer of a model between torch's and ours.
* :class:`MaxPool2d`: torch's layer, keeping ATen's kernels under ``torch.compile`` on CPU.
"""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.convert import convert_batchnorm
from bnlab.nn.noisy import NoisyBatchNorm1d, NoisyBatchNorm2d
from bnlab.nn.pooling import MaxPool2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "MaxPool2d",
    "NoisyBatchNorm1d",
    "NoisyBatchNorm2d",
    "convert_batchnorm",
]
