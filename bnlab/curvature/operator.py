"""The Hessian of a model's loss on one batch, as a linear operator (Hessian-vector products).

``hessian_operator`` runs one forward and one backward with ``create_graph=True`` and keeps
that graph; each ``HessianOperator.matvec(v)`` is then one more backward through it, the
double backward ``∂(∇L · v)/∂w = H v``. So every product of one operator is a product with
the Hessian of one and the same function: the same batch, the same statistics, the same
dropout masks and BN noise (drawn once, in that forward, under a fixed seed).

What is differentiated (see the package docstring for the modes):

- the loss ``loss_fn(model(x), y)`` in the model's dtype, without autocast;
- with respect to the selected parameters only (the others, and every buffer, are constants),
  so a subset gives the principal block ``H[S, S]`` of the full Hessian;
- ``model`` itself is never written: its parameters enter ``functional_call`` as detached
  tensors, its buffers as copies (a train-mode forward updates those, not the model's), its
  train/eval flags are put back (``read_only``), the global RNG streams are forked and
  restored (``fixed_rng``), and ``.grad`` is never touched (``torch.autograd.grad``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.errors import UsageError
from bnlab.nn import DecorrelatedBatchNorm1d, DecorrelatedBatchNorm2d
from bnlab.nn.stats import batch_statistics_layers
from bnlab.precise_bn import precise_bn_copy
from bnlab.probes.readonly import fixed_rng, read_only

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = str | Sequence[str] | None
BN_MODES = ("batch", "running", "population")
DTYPES = (torch.float32, torch.float64)


def resolve_bn(model: nn.Module, bn: str | None) -> str:
    """The statistics mode: ``bn`` itself, or by default the model's own mode (train mode →
    ``batch``, eval mode → ``running``)."""
    if bn is None:
        return "batch" if model.training else "running"
    if bn not in BN_MODES:
        raise UsageError(f"bn={bn!r} is invalid; allowed: {', '.join(BN_MODES)}")
    return bn


def select_parameters(model: nn.Module, params: Params) -> list[str]:
    """The names (as ``model.named_parameters()`` gives them, in that order) of the trainable
    parameters that ``params`` selects: all of them for None; for a string, the parameters of
    the module at that path and its submodules (``""`` is the whole model), or the single
    parameter of that name; for a list, the union of what its entries select (one block over
    all of them, cross terms included; call once per entry for separate blocks)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = set(trainable)
    else:
        paths = [params] if isinstance(params, str) else list(params)
        if not paths or not all(isinstance(p, str) for p in paths):
            raise UsageError(f"params={params!r} is invalid; allowed: None (all trainable "
                             "parameters), a module path or parameter name, or a list of them")
        chosen = set()
        for path in paths:
            chosen |= _parameters_at(model, path, trainable)
    if not chosen:
        raise UsageError("the model has no trainable parameters (requires_grad=True)")
    return [n for n in trainable if n in chosen]


def _parameters_at(model: nn.Module, path: str, trainable: list[str]) -> set[str]:
    if path in trainable:
        return {path}
    modules = dict(model.named_modules())
    if path not in modules:
        owners = [o for o in dict.fromkeys(n.rpartition(".")[0] for n in trainable) if o]
        shown = ", ".join(owners[:12]) + (f", ... ({len(owners)} in all)" if len(owners) > 12
                                          else "")
        raise UsageError(f"params={path!r} is not a module path or parameter of the model; "
                         f"allowed: a module path such as {shown}")
    prefix = f"{path}." if path else ""
    found = {n for n in trainable if n.startswith(prefix)}
    if not found:
        raise UsageError(f"params={path!r}: module {path!r} has no trainable parameters")
    return found


def _check_double_backward(model: nn.Module) -> None:
    """Refuse layers whose backward is not differentiable in the mode they run in: the
    Hessian-vector product would come out wrong, silently (``once_differentiable`` raises
    only when its inputs ask for a gradient, which they need not do here)."""
    for name, m in model.named_modules():
        zca = isinstance(m, DecorrelatedBatchNorm1d | DecorrelatedBatchNorm2d) and (
            m.whitening == "zca")
        if zca and m.training:
            raise UsageError(
                f"bn='batch': decorrelated BN with ZCA whitening ({name}) has no double "
                "backward with batch statistics (the backward of its eigendecomposition is "
                "once-differentiable); use bn='running' or bn='population', or IterNorm")


class HessianOperator:
    """H = ∇²L over the selected parameters, flattened: the parameters in ``names`` order, each
    in its logical (row-major) element order, ``dim`` values in all. ``gradient`` is ∇L of the
    same function, ``loss`` its value. Made by :func:`hessian_operator`."""

    def __init__(self, names: list[str], leaves: list[Tensor], loss: Tensor,
                 grads: Sequence[Tensor]) -> None:
        self.names = names
        self.shapes = [leaf.shape for leaf in leaves]
        self._leaves = leaves
        self._flat_grad = torch.cat([g.reshape(-1) for g in grads])
        self.loss = loss.detach()
        self.gradient = self._flat_grad.detach()
        self.dim = self.gradient.numel()
        self.dtype, self.device = self.gradient.dtype, self.gradient.device

    def matvec(self, v: Tensor) -> Tensor:
        """H v for a flat vector ``v`` of ``dim`` values (one backward through the kept
        graph)."""
        if not self._flat_grad.requires_grad:  # the gradient is constant: H = 0
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self._flat_grad, self._leaves, v, retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """A flat vector as one tensor per parameter name."""
        parts = v.split([s.numel() for s in self.shapes])
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}


def hessian_operator(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                     params: Params = None, bn: str | None = None,
                     population_batches: Iterable[Tensor] | None = None) -> HessianOperator:
    """The Hessian of ``loss_fn(model(x), y)`` over the parameters ``params`` selects
    (:func:`select_parameters`), with the norm layers' statistics chosen by ``bn``
    (:func:`resolve_bn`; ``population`` needs ``population_batches``, the input tensors from
    which a copy of the model re-estimates them). Nothing of ``model`` changes."""
    mode = resolve_bn(model, bn)
    names = select_parameters(model, params)
    dtypes = {str(p.dtype) for n, p in model.named_parameters() if n in names
              and p.dtype not in DTYPES}
    if dtypes:
        raise UsageError(f"curvature needs float32 or float64 parameters, got "
                         f"{', '.join(sorted(dtypes))}")
    net = model
    if mode == "population":
        if population_batches is None:
            raise UsageError("bn='population' needs population_batches: the input batches "
                             "from which the population statistics are estimated")
        try:
            net = precise_bn_copy(model, population_batches, sys.maxsize)
        except ValueError as e:
            raise UsageError(f"population_batches: {e}") from None
    with (read_only(net), fixed_rng(x.device), torch.enable_grad(),
          torch.autocast(x.device.type, enabled=False)):
        # Only the layers with running statistics change mode; dropout and the rest keep the
        # model's flags, so two modes differ in the statistics and nothing else.
        for layer in batch_statistics_layers(net, running=True).values():
            layer.training = mode == "batch"
        _check_double_backward(net)
        own = dict(net.named_parameters())
        leaves = {n: own[n].detach().requires_grad_() for n in names}
        # Buffer copies: the graph keeps what it saved of them, and read_only may write the
        # model's buffers back in place, which would invalidate saved tensors.
        state = {**{n: p.detach() for n, p in own.items()}, **leaves,
                 **{n: b.clone() for n, b in net.named_buffers()}}
        loss = loss_fn(functional_call(net, state, (x,)), y)
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                    allow_unused=True, materialize_grads=True)
    return HessianOperator(names, list(leaves.values()), loss, grads)
