r"""Weight standardization: conv layers that normalize their own weights, not their outputs.

Both layers re-standardize the weight at every forward from the raw parameter ``weight``
(autograd differentiates through the standardization, which is cheap: it runs on the weight,
not on the activations). For output channel i, over its fan-in (the N = C_in·k_h·k_w weights
W_i· that feed it), μ_i is the mean and σ²_i the biased variance.

* :class:`WSConv2d` (Qiao et al. 2019, "Micro-Batch Training with Batch-Channel Normalization
  and Weight Standardization", Eqs. 5–6): Ŵ_ij = (W_ij − μ_i) / sqrt(σ²_i + eps). Each output
  channel's weights have mean 0 and (up to eps) unit variance, so the layer's output scales
  with the fan-in: WS is meant to be followed by a norm (``norm=group model.weight_std=ws``
  is GN+WS). The authors' code adds eps = 1e-5 to the unbiased std instead; the paper's
  formula is the one here.
* :class:`ScaledWSConv2d` (Brock et al. 2021, arXiv 2101.08692, Sec. 4.2, "Scaled WS"):
  Ŵ_ij = γ · g_i · (W_ij − μ_i) / (σ_i · sqrt(N)), with a learnable gain g_i (initialized
  to 1) per output channel and the fixed ReLU gain γ = sqrt(2 / (1 − 1/π)): for z ~ N(0, 1),
  Var(ReLU(z)) = (1 − 1/π)/2, so a conv with this weight maps the ReLU of a unit-variance
  signal to a unit-variance signal, and the zero-mean rows remove the ReLU's mean shift. A
  conv whose input is not a ReLU output (the first conv, on the image) takes ``gamma=1``.
  σ_i·sqrt(N) is computed as sqrt(N·σ²_i + eps) (eps = 1e-4, DeepMind's value; their code
  clamps N·σ²_i at eps instead, which agrees with this to O(eps/(N·σ²_i)) on any weight that
  is not constant, and both keep a constant one finite). DeepMind's code puts γ into the
  activation function (``relu(x) * 1.7139...``, an empirical estimate of the same constant);
  here it is part of the weight of the conv that follows the ReLU, which is the same map.

Linear layers are never standardized (neither paper does: WS is defined for conv layers, and
NF-ResNets' classifier is a plain linear layer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["RELU_GAIN", "ScaledWSConv2d", "WSConv2d", "standardize_weight"]

RELU_GAIN = math.sqrt(2 / (1 - 1 / math.pi))
"""γ of Scaled WS for ReLU: 1 / std(ReLU(z)) for z ~ N(0, 1)."""


def standardize_weight(weight: Tensor, eps: float) -> Tensor:
    """(W − μ) / sqrt(σ² + eps) per output channel (dim 0), over the fan-in (all other dims);
    σ² is the biased variance, computed in two passes."""
    dims = list(range(1, weight.dim()))
    mean = weight.mean(dims, keepdim=True)
    centred = weight - mean
    var = centred.square().mean(dims, keepdim=True)
    return centred * torch.rsqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardization (Qiao et al. 2019): the conv uses
    ``standardized_weight()``, the parameter ``weight`` stays raw. Same arguments as
    ``nn.Conv2d`` plus ``eps``."""

    def __init__(self, *args: object, eps: float = 1e-5, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        return standardize_weight(self.weight, self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class ScaledWSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Scaled WS (Brock et al. 2021): ``standardized_weight()`` =
    γ · gain · (W − μ) / (σ·sqrt(fan_in)). Same arguments as ``nn.Conv2d`` plus ``gamma`` (the
    fixed gain, :data:`RELU_GAIN` for a conv after a ReLU, 1 on the image) and ``eps``; the
    learnable per-channel ``gain`` starts at 1."""

    def __init__(self, *args: object, gamma: float = RELU_GAIN, eps: float = 1e-4,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gamma, self.eps = gamma, eps
        self.gain = nn.Parameter(torch.ones(self.out_channels, device=self.weight.device,
                                            dtype=self.weight.dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "gain"):  # (nn.Conv2d's constructor calls this before gain exists)
            nn.init.ones_(self.gain)

    def standardized_weight(self) -> Tensor:
        fan_in = self.weight[0].numel()
        # sqrt(σ² + eps/N)·sqrt(N) = sqrt(N·σ² + eps)
        unit = standardize_weight(self.weight, self.eps / fan_in)
        scale = self.gain * (self.gamma / math.sqrt(fan_in))
        return unit * scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"
