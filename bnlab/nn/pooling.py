"""``MaxPool2d``: torch's layer, but under ``torch.compile`` on CPU it keeps ATen's kernels.

In torch 2.14 Inductor generates its own CPU kernel for max-pooling with indices, and it is
slower than ATen's: 3x for the forward + backward of the cnn's first 2x2 pool (its int8 offsets
are stored through a slow vectorized path), enough to make a compiled cnn step slower than eager
(``scripts/bench_compile_ops.py``, docs/benchmarks.md). Under compile on CPU this layer calls
ATen's forward and backward kernels through two custom ops, which Inductor calls as they are,
as it does convolutions; the model stays one graph. Everywhere else (and with
``return_indices=True``) it is ``nn.MaxPool2d``. The ops have no double backward, which AOT
autograd does not support under compile anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

aten = torch.ops.aten


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _pool_kernel(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                 dilation: list[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    return aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)


def _pool_backward_kernel(grad: Tensor, x: Tensor, indices: Tensor, kernel_size: list[int],
                          stride: list[int], padding: list[int], dilation: list[int],
                          ceil_mode: bool) -> Tensor:
    return aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                 ceil_mode, indices)


# Each function is both the op and its fake (meta) implementation: on fake tensors the ATen op
# gives the real kernel's shapes and strides.
_max_pool2d = torch.library.custom_op("bnlab::max_pool2d", _pool_kernel, mutates_args=())
_max_pool2d.register_fake(_pool_kernel)
_max_pool2d_backward = torch.library.custom_op(
    "bnlab::max_pool2d_backward", _pool_backward_kernel, mutates_args=())
_max_pool2d_backward.register_fake(_pool_backward_kernel)


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    x, *ctx.pool_args = inputs
    ctx.save_for_backward(x, output[1])


def _backward(ctx: Any, grad: Tensor, _grad_indices: Tensor | None) -> tuple:
    x, indices = ctx.saved_tensors
    return _max_pool2d_backward(grad, x, indices, *ctx.pool_args), None, None, None, None, None


_max_pool2d.register_autograd(_backward, setup_context=_setup_context)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, state and output); see the module docstring."""

    def forward(self, input: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and input.device.type == "cpu" and not self.return_indices:
            args = [_pair(a) for a in (self.kernel_size, self.stride, self.padding, self.dilation)]
            return _max_pool2d(input, *args, self.ceil_mode)[0]
        return super().forward(input)
