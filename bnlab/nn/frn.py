r"""Filter Response Normalization with its Thresholded Linear Unit (Singh & Krishnan, "Filter
Response Normalization Layer: Eliminating Batch Dependence in the Training of Deep Neural
Networks", CVPR 2020, arXiv 1911.09737), written from scratch.

Each sample ``n`` and channel ``c`` is normalized on its own, over the :math:`L` positions of
its map (:math:`L = H W` for a conv feature map)::

    nu2   = 1/L sum_l x^2                       the mean squared value: no mean is subtracted
    x_hat = x / sqrt(nu2 + eps)
    y     = max(gamma_c * x_hat + beta_c, tau_c)   the TLU: a ReLU with a learned threshold

No batch statistics and no running statistics: training and evaluation are the same map.

``eps`` is a constant, or learned (``learnable_eps=True``): :math:`\epsilon = \epsilon_{min} +
|\epsilon_l|` with one scalar parameter :math:`\epsilon_l` per layer (``learned_eps``, started
at ``eps_init``) and the constant as its lower bound, as the paper learns it. (A learned part
started at 0 would never move: the gradient of :math:`|\cdot|` at 0 is 0.)

**1×1 maps and the hidden linear slot.** On a map of one position :math:`\nu^2 = x^2` and
:math:`\hat x = x / \sqrt{x^2 + \epsilon}`: a smooth sign, within (−1, 1) and finite for every
x, with the finite derivative :math:`\epsilon / (x^2 + \epsilon)^{3/2} \le 1/\sqrt{\epsilon}`
(at x = 0). This is the degenerate case the paper names, and the one its learned ε is for (a
larger ε keeps :math:`\hat x` closer to linear). An ``(N, C)`` input (a hidden linear layer's
output) is taken as that case, a map of one position, so the layer computes the paper's formula
there too rather than switching to statistics over the features. In bnlab's VGGs this is where
the 1×1 map after the fifth pooling ends up: flattened, it feeds the hidden linear slots (their
last conv stage runs at 2×2). ``(N, C, L)`` and 3-d maps are handled alike (the statistics run
over every position).

In bnlab's models a slot is followed by the model's ReLU (conv → slot → ReLU), where the paper
replaces BN + ReLU by FRN + TLU: there ``relu(max(y, tau)) = max(y, max(tau, 0))``, and the
ReLU passes no gradient at 0, so τ, which starts at 0, gets none and stays 0: the TLU acts as
that ReLU. The threshold learns where something else follows the layer: a residual block's
last slot and its shortcut's (the sum comes before the ReLU), a model that puts FRN in place of
its norm *and* ReLU, a user's model through ``replace_batchnorm``.

:func:`filter_response_norm` is the reference: plain differentiable tensor ops (autograd
backward, double backward, ``torch.compile``). Eager calls take the fast path of
:mod:`bnlab.nn.normfree_fast` (the same values, a hand-derived backward) unless the layer's
``fast`` is False; ``forward`` shows the choice. Half inputs are computed in float32 and
returned in their dtype; NCHW and channels_last inputs keep their memory format.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.parameter import Parameter

from bnlab.nn import normfree_fast
from bnlab.nn.functional import compute_dtype, per_channel, per_row, row_sums

__all__ = ["FilterResponseNorm", "filter_response_norm"]


def filter_response_norm(input: Tensor, weight: Tensor, bias: Tensor, tau: Tensor,
                         eps: float | Tensor) -> Tensor:
    """FRN + TLU of an ``(N, C, *)`` input with per-channel ``weight`` (γ), ``bias`` (β) and
    ``tau`` (τ) and a scalar ``eps`` (a float, or a 0-d tensor when learned); see the module
    docstring. The reference: plain differentiable ops."""
    x = input.to(compute_dtype(input.dtype))
    ndim = x.dim()
    nu2 = per_row(row_sums(x.square()) / math.prod(x.shape[2:]), ndim)  # an (N, C) input: x²
    x_hat = x * torch.rsqrt(nu2 + eps)
    y = per_channel(weight.to(x.dtype), ndim) * x_hat + per_channel(bias.to(x.dtype), ndim)
    # max(y, tau) as the paper rewrites it, relu(y - tau) + tau: at a tie the gradient goes to
    # tau (torch.maximum would split it), as in the fast path
    tau = per_channel(tau.to(x.dtype), ndim)
    return (torch.relu(y - tau) + tau).to(input.dtype)


class FilterResponseNorm(nn.Module):
    r"""Filter Response Normalization with the TLU (Singh & Krishnan, CVPR 2020), over an
    :math:`(N, C, *)` input: :math:`y = \max(\gamma x / \sqrt{\nu^2 + \epsilon} + \beta, \tau)`
    with :math:`\nu^2` the mean of :math:`x^2` over the positions of each sample and channel
    (see :mod:`bnlab.nn.frn`, also for the 1×1-map and ``(N, C)`` case).

    Args:
        num_features: number of channels :math:`C`
        eps: the constant ε, or with ``learnable_eps`` the lower bound of the learned one.
            Default: 1e-6 (the paper's)
        learnable_eps: learn :math:`\epsilon = \text{eps} + |\epsilon_l|` (a scalar
            ``learned_eps`` parameter). Default: False
        eps_init: the value :math:`\epsilon_l` starts from with ``learnable_eps`` (> 0).
            Default: 1e-4
        device, dtype: factory arguments for the parameters.
        fast: (keyword-only) eager calls take the fast path (:mod:`bnlab.nn.normfree_fast`);
            False: the reference. Default: True

    Parameters: ``weight`` (γ, ones), ``bias`` (β, zeros), ``tau`` (τ, zeros), each ``(C,)``;
    ``learned_eps`` (0-d) with ``learnable_eps``. No buffers.

    Shape:
        - Input: :math:`(N, C, *)`; output: same shape.
    """

    __constants__: ClassVar[list[str]] = ["num_features", "eps", "learnable_eps", "eps_init"]
    num_features: int
    eps: float
    learnable_eps: bool
    eps_init: float

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        eps_init: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fast: bool = True,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 1:
            raise ValueError(f"num_features must be an integer >= 1, got {num_features!r}")
        for name, value in (("eps", eps), ("eps_init", eps_init)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(learnable_eps, bool):
            raise ValueError(f"learnable_eps must be a bool, got {learnable_eps!r}")
        super().__init__()
        factory_kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.learnable_eps = learnable_eps
        self.eps_init = float(eps_init)
        self.fast = fast
        self.weight = Parameter(torch.empty(num_features, **factory_kwargs))
        self.bias = Parameter(torch.empty(num_features, **factory_kwargs))
        self.tau = Parameter(torch.empty(num_features, **factory_kwargs))
        if learnable_eps:
            self.learned_eps = Parameter(torch.empty((), **factory_kwargs))
        else:
            self.register_parameter("learned_eps", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, τ = 0 (the TLU starts as a ReLU), ε_l = ``eps_init``."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.zeros_(self.tau)
        if self.learned_eps is not None:
            init.constant_(self.learned_eps, self.eps_init)

    def effective_eps(self) -> float | Tensor:
        """The ε of this forward: ``eps``, or ``eps + |learned_eps|`` (a 0-d tensor)."""
        if self.learned_eps is None:
            return self.eps
        return self.eps + self.learned_eps.abs()

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"expected an (N, {self.num_features}, *) input, got input of size "
                             f"{tuple(input.shape)}")
        eps = self.effective_eps()
        if self.fast and not torch.compiler.is_compiling():
            return normfree_fast.filter_response_norm(input, self.weight, self.bias, self.tau,
                                                      eps, filter_response_norm)
        return filter_response_norm(input, self.weight, self.bias, self.tau, eps)

    def extra_repr(self) -> str:
        learned = f", learnable_eps=True, eps_init={self.eps_init}" if self.learnable_eps else ""
        return f"{self.num_features}, eps={self.eps}{learned}"
