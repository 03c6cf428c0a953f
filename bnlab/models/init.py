"""Weight initialization (``model.init``), then each architecture's own rule on top."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv/linear weights: ``kaiming`` (He et al. 2015: fan-in, so the forward
    signal keeps its scale through ReLU layers even without a norm), ``xavier`` (Glorot &
    Bengio 2010), or ``torch`` (PyTorch's defaults, left untouched); biases start at 0.

    Then every module with an ``init_residual_branches()`` method applies its residual
    scheme's rule on top of that standard init (Fixup rescales and zeroes layers of its
    branches, ``bnlab.models.resnet``), whatever ``scheme`` is.

    A model on the meta device (``bnlab.config.validate``'s build) has no values to set: it is
    left alone, which also spares the CLI importing ``torch._dynamo``, which random init on
    meta tensors would do."""
    if any(p.is_meta for p in model.parameters()):
        return
    if scheme != "torch":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if scheme == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    for m in model.modules():
        rule = getattr(m, "init_residual_branches", None)
        if callable(rule):
            rule()
