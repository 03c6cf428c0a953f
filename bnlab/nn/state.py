"""Module state of the from-scratch norm layers, apart from their math.

:class:`RunningStatsNorm` mirrors what ``torch/nn/modules/batchnorm.py``'s ``_NormBase`` keeps
(constructor, parameter and buffer names, reset, ``extra_repr``, state-dict versioning), so a
layer built on it is a drop-in replacement for a torch batch-norm layer and their state dicts
load into each other. The formulas live in :mod:`bnlab.nn.functional`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

__all__ = ["Input1d", "Input2d", "RunningStatsNorm", "register_affine"]


class RunningStatsNorm(nn.Module):
    """Module state of a norm layer with per-channel running statistics, as torch's ``_NormBase``:
    ``weight``/``bias`` (γ, β), ``running_mean``/``running_var``/``num_batches_tracked`` buffers,
    options, reset, ``extra_repr`` and state-dict versioning. No math: subclasses define
    ``forward`` (batch norm, Batch Renorm, Ghost BN share this state, so their state dicts load
    into ``torch.nn.BatchNorm*`` and back). ``fast`` (keyword-only, a plain attribute, not in
    the state dict or ``extra_repr``): whether eager calls take the layer's fast path."""

    _version = 2
    __constants__: ClassVar[list[str]] = [
        "track_running_stats",
        "momentum",
        "eps",
        "num_features",
        "affine",
    ]
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    fast: bool

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        fast: bool = True,
    ) -> None:
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.fast = fast
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, affine, bias, factory_kwargs)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.running_mean: Tensor | None
            self.running_var: Tensor | None
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.num_batches_tracked: Tensor | None
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Set ``running_mean`` to 0, ``running_var`` to 1 and ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.running_var.fill_(1)  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def reset_parameters(self) -> None:
        """Reset the running statistics, set :math:`\\gamma = 1` and :math:`\\beta = 0`."""
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def momentum_factor(self) -> float:
        """The running-statistics factor of this forward call, advancing the counter as torch
        does: ``momentum``, or ``1/num_batches_tracked`` (cumulative moving average) when
        ``momentum`` is None. Counts every training step that tracks statistics, before any
        check on the batch itself; 0.0 when nothing is tracked."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def uses_batch_stats(self) -> bool:
        """Batch statistics in training mode, and in eval mode when there are no buffers."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def buffers_for_call(self) -> tuple[Tensor | None, Tensor | None]:
        """The running statistics to pass on: only if they are to be updated (training and
        tracked) or used for normalization (eval mode)."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "bias={use_bias}, track_running_stats={track_running_stats}".format(
                **self.__dict__, use_bias=self.bias is not None
            )
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if (version is None or version < 2) and self.track_running_stats:
            # Version 2 added the num_batches_tracked buffer; checkpoints written before it
            # load with the current counter (or 0), so strict loading still succeeds.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                state_dict[key] = (
                    self.num_batches_tracked
                    if self.num_batches_tracked is not None
                    and self.num_batches_tracked.device != torch.device("meta")
                    else torch.tensor(0, dtype=torch.long)
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def register_affine(module: nn.Module, num_features: int, affine: bool, bias: bool,
                    factory_kwargs: dict[str, Any]) -> None:
    """Register γ (``weight``) and β (``bias``) of ``num_features``, or None for either, as
    torch's norm layers do (``affine=False``: neither; ``bias=False``: no β); values are set by
    the layer's ``reset_parameters``."""
    if affine:
        module.weight = Parameter(torch.empty(num_features, **factory_kwargs))
        if bias:
            module.bias = Parameter(torch.empty(num_features, **factory_kwargs))
        else:
            module.register_parameter("bias", None)
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)


class Input1d:
    """Mixin: the input ranks of torch's ``BatchNorm1d``, ``(N, C)`` or ``(N, C, L)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class Input2d:
    """Mixin: the input rank of torch's ``BatchNorm2d``, ``(N, C, H, W)``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
