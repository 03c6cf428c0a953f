"""torch-compatibility rules of the from-scratch norm layers, apart from their math.

What ``torch.nn.functional.batch_norm`` and its CPU kernel (torch 2.14) do besides normalizing,
ported so that a custom layer is a drop-in replacement: which errors it raises, with which
messages and in which order (:func:`verify_batch_size`, :func:`check_eps`,
:func:`check_params` with :func:`check_num_features` and :func:`check_dtypes`), what an empty
batch gives (:func:`empty_batch_output`), the dtypes of the parameter gradients
(:func:`save_param_dtypes`, :func:`requested_grads`, for the autograd Functions of the
reference and of the fast path), and the memory format of outputs and input gradients
(:func:`output_memory_format`, :func:`suggest_memory_format`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_dtypes",
    "check_eps",
    "check_num_features",
    "check_params",
    "cpp_dtype_name",
    "empty_batch_output",
    "output_memory_format",
    "requested_grads",
    "save_param_dtypes",
    "suggest_memory_format",
    "verify_batch_size",
]

# Input dtypes the CPU kernel accepts; the half types may come with float32 parameters.
_REDUCED_FLOATS = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (*_REDUCED_FLOATS, torch.float32, torch.float64)

# Names torch's C++ error messages use for dtypes ("expected scalar type Float but ...").
_CPP_DTYPE_NAMES = {
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def cpp_dtype_name(dtype: torch.dtype) -> str:
    """The name torch's C++ code gives ``dtype`` in error messages (``torch.float32``: Float)."""
    if dtype in _CPP_DTYPE_NAMES:
        return _CPP_DTYPE_NAMES[dtype]
    name = str(dtype).removeprefix("torch.")  # e.g. float8_e4m3fn -> Float8_e4m3fn
    return name[:1].upper() + name[1:]


# --------------------------------------------------------------------------------------------
# Argument checks, in the order torch makes them
# --------------------------------------------------------------------------------------------


def verify_batch_size(size: torch.Size) -> None:
    """Training needs more than one value per channel (else the variance is undefined)."""
    size_prods = size[0]
    for s in size[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def check_eps(eps: float, training: bool) -> None:
    """``eps`` must be positive with batch statistics, non-negative with running ones."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_num_features(name: str, expected: int, tensor: Tensor) -> None:
    """A per-channel tensor (``name``) must have one element per channel."""
    if tensor.numel() != expected:
        raise RuntimeError(f"{name} should contain {expected} elements not {tensor.numel()}")


def check_dtypes(x: Tensor, params: list[Tensor | None]) -> None:
    """The CPU kernel's dtype rules (aten/src/ATen/native/mixed_type.h): float inputs, and
    parameters/buffers of the input's dtype, or all float32 with a half input."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{cpp_dtype_name(x.dtype)}'")
    defined = [p for p in params if p is not None]
    if not defined:
        return
    if defined[0].dtype != x.dtype:
        # "Mixed" mode: only half/bfloat16 inputs with float32 parameters and buffers.
        if any(p.dtype != torch.float32 for p in defined):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        if x.dtype not in _REDUCED_FLOATS:
            raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
        return
    for p in defined:
        if p.dtype != x.dtype:
            raise RuntimeError(
                f"expected scalar type {cpp_dtype_name(x.dtype)} "
                f"but found {cpp_dtype_name(p.dtype)}"
            )


def check_params(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> None:
    """One element per channel in every per-channel tensor given, running statistics present
    in evaluation mode, and the dtype rules of :func:`check_dtypes`."""
    num_features = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            check_num_features(name, num_features, t)
        elif not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_num_features(name, num_features, t)
    check_dtypes(x, [weight, bias, running_mean, running_var])


def empty_batch_output(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What ATen returns for an input with no elements: no statistics, no update, but an output
    still connected to ``weight`` and ``bias`` (their grads come out as zeros, not None)."""
    out = x.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out


# --------------------------------------------------------------------------------------------
# Gradient dtypes
# --------------------------------------------------------------------------------------------


def save_param_dtypes(ctx: Any, weight: Tensor | None, bias: Tensor | None) -> None:
    """Record on an autograd Function's ``ctx`` the dtypes its parameter grads must have (the
    parameters', also when the math ran in float32 for half parameters)."""
    ctx.param_dtypes = (
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
    )


def requested_grads(
    ctx: Any, dx: Tensor | None, d_weight: Tensor | None, d_bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The grads of ``(x, weight, bias)`` that autograd asked for (the others may be None), in
    the dtypes :func:`save_param_dtypes` recorded."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        dx if need_x else None,
        d_weight.to(w_dtype) if need_w else None,
        d_bias.to(b_dtype) if need_b else None,
    )


# --------------------------------------------------------------------------------------------
# Memory formats
# --------------------------------------------------------------------------------------------


def _strides_like_channels_last(sizes: torch.Size, strides: tuple[int, ...]) -> bool:
    """Python port of c10's ``is_channels_last_strides_{2d,3d}``.

    ``Tensor.suggest_memory_format()`` looks at the *order* of the strides, not at contiguity:
    a sliced channels_last tensor still suggests channels_last. There is no public Python API
    for it, so it is ported here (ambiguous cases fall back to contiguous, as in c10).
    """
    order = (1, 3, 2, 0) if len(sizes) == 4 else (1, 4, 3, 2, 0)
    if strides[1] == 0:  # trivial C dimension: default to NCHW
        return False
    minimum = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < minimum:
            return False
        # N111-like tensors with identical strides are ambiguous: c10 picks contiguous.
        if d == 0 and minimum == strides[1]:
            return False
        minimum = strides[d]
        if sizes[d] > 1:
            minimum *= sizes[d]
    return True


def suggest_memory_format(x: Tensor) -> torch.memory_format:
    """``x.suggest_memory_format()``: the format torch's CPU kernel gives the input gradient."""
    # (Only dense strided tensors get here; the layout is not queried because dynamo forbids
    # reading it inside a custom Function's backward.)
    if x.dim() in (4, 5) and _strides_like_channels_last(x.shape, x.stride()):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The format torch's CPU kernel gives the forward output: contiguous inputs (including
    ambiguous ones such as channels_last (N, C, 1, 1)) stay contiguous, others as suggested."""
    return torch.contiguous_format if x.is_contiguous() else suggest_memory_format(x)
