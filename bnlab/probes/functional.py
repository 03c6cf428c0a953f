"""Loss and gradients at substituted weights, without writing the model's parameters or .grad."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.probes.readonly import fixed_rng

LossFn = Callable[[Tensor, Tensor], Tensor]


def loss_and_grads(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor,
                   params: Mapping[str, Tensor], wrt: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
    """``L`` and ``∇L`` with respect to ``params[n] for n in wrt``, in one forward where the
    tensors in ``params`` replace the model's parameters of the same name (the rest are the
    model's own). Runs under the fixed probe seed, without autocast; a parameter the loss
    does not reach gets a zero gradient. Nothing of the model is written (buffers excepted:
    see ``read_only``)."""
    with (fixed_rng(inputs.device), torch.enable_grad(),
          torch.autocast(inputs.device.type, enabled=False)):
        out = functional_call(model, dict(params), (inputs,))
        loss = loss_fn(out.float(), targets)
        grads = torch.autograd.grad(loss, [params[n] for n in wrt], allow_unused=True,
                                    materialize_grads=True)
    return loss.detach(), [g.detach() for g in grads]
