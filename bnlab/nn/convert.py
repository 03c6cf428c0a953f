"""Swap every batch-norm layer of a model between torch's implementation and ours
(:func:`convert_batchnorm`), or replace it by any layer of the zoo (:func:`replace_batchnorm`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.distributed as dist
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.syncbn import SyncBatchNorm

__all__ = ["convert_batchnorm", "replace_batchnorm"]

_ALLOWED = ("custom", "torch", "sync")

# Exact classes only. Subclasses (ours: the noisy layers; user subclasses of torch's layers)
# may change forward() in ways the other implementation cannot reproduce, so they are left
# alone rather than silently losing behaviour. Lazy layers that are not yet initialized have
# no parameters to carry over and are also left alone.
_TO_CUSTOM: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {v: k for k, v in _TO_CUSTOM.items()}
# Any batch norm of a fixed rank becomes the synchronized layer, which takes every rank.
_TO_SYNC: dict[type[nn.Module], type[nn.Module]] = {cls: SyncBatchNorm for cls in
                                                    (*_TO_CUSTOM, *_TO_TORCH)}


def _swap(old: nn.Module, new_cls: type[nn.Module]) -> nn.Module:
    """Build a ``new_cls`` layer that *shares* ``old``'s parameters and buffers.

    The very same Parameter and buffer objects are moved over (as
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does), so device, dtype, ``requires_grad``,
    values and optimizer references are kept. The new layer is built on the meta device so
    no memory is allocated for tensors that are immediately replaced.
    """
    kwargs = {}
    if old.affine and old.bias is None:  # type: ignore[union-attr]
        kwargs["bias"] = False  # only passed when needed: older torch lacks the keyword
    new = new_cls(
        old.num_features,  # type: ignore[arg-type]
        old.eps,
        old.momentum,
        old.affine,
        old.track_running_stats,
        device="meta",
        **kwargs,
    )
    # Copy the registries wholesale: this also carries over attributes changed after
    # construction (e.g. track_running_stats toggled with buffers still present).
    new._parameters.clear()
    new._parameters.update(old._parameters)
    new._buffers.clear()
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        setattr(new, attr, getattr(old, attr))
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _convert(
    module: nn.Module,
    replace: Callable[[nn.Module], nn.Module | None],
    memo: dict[int, nn.Module],
) -> nn.Module:
    # The memo keeps a layer that appears several times in the model (weight sharing) as one
    # shared layer after conversion.
    if id(module) in memo:
        return memo[id(module)]
    out = replace(module) or module
    memo[id(module)] = out
    # _modules rather than named_children(): the latter skips repeated (shared) children.
    for name, child in list(module._modules.items()):
        if child is not None:
            out.add_module(name, _convert(child, replace, memo))
    return out


def convert_batchnorm(module: nn.Module, to: Literal["custom", "torch", "sync"] = "custom",
                      process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every batch-norm layer in ``module`` by the other implementation, or by the
    synchronized one.

    ``to="custom"`` turns :class:`torch.nn.BatchNorm1d`/``2d``/``3d`` and
    :class:`torch.nn.SyncBatchNorm` into :class:`bnlab.nn.BatchNorm1d`/``2d``/``3d`` and
    :class:`bnlab.nn.SyncBatchNorm`; ``to="torch"`` does the reverse. ``to="sync"`` turns each
    of these (torch's or ours) into :class:`bnlab.nn.SyncBatchNorm` over ``process_group``
    (None: a synchronized layer keeps its group, others get the whole world), as
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm` does. Parameters and buffers are
    shared with the converted layer (same tensors: device, dtype, values, ``requires_grad``
    and optimizer references are kept), as is the training mode.

    Only those exact classes are converted. Left unchanged: subclasses (including
    :class:`bnlab.nn.NoisyBatchNorm1d`/``2d``, which have no torch counterpart) and
    uninitialized lazy batch-norm layers. Hooks registered on a converted layer are not
    carried over.

    Like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`, children are replaced in place
    and the (possibly new) root is returned, so always use the return value::

        model = convert_batchnorm(model, to="custom")

    Args:
        module: the model (or a single layer) to convert.
        to: ``"custom"``, ``"torch"`` or ``"sync"``.
        process_group: the group of the synchronized layers ``to="sync"`` makes.

    Raises:
        ValueError: if ``to`` is not one of the allowed values.
        TypeError: if ``module`` is not an :class:`torch.nn.Module`.
    """
    if not isinstance(to, str) or to not in _ALLOWED:
        raise ValueError(
            f"convert_batchnorm: invalid to={to!r}; allowed values are "
            + ", ".join(repr(a) for a in _ALLOWED)
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_batchnorm: expected an nn.Module, got {type(module).__name__}")
    mapping = {"custom": _TO_CUSTOM, "torch": _TO_TORCH, "sync": _TO_SYNC}[to]

    def swap(old: nn.Module) -> nn.Module | None:
        new_cls = mapping.get(type(old))
        if new_cls is None:
            return None
        new = _swap(old, new_cls)
        if hasattr(new, "process_group"):
            new.process_group = (process_group if process_group is not None
                                 else getattr(old, "process_group", None))
        return new

    return _convert(module, swap, {})


# The batch-norm classes replace_batchnorm replaces, with the dims passed to the factory.
_DIMS: dict[type[nn.Module], int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, BatchNorm1d: 1,
                                     BatchNorm2d: 2}


def replace_batchnorm(module: nn.Module, factory: Callable[[int, int], nn.Module]) -> nn.Module:
    """Replace every 1-d/2-d batch-norm layer of ``module`` (torch's or ours, exact classes) by
    ``factory(num_features, dims)``: any layer of the zoo, e.g. a ``bnlab.norms`` option::

        from bnlab.registry import load_option
        model = replace_batchnorm(torchvision.models.resnet18(), load_option("norm", "renorm"))
        model = replace_batchnorm(model, lambda c, dims: bnlab.nn.GroupNorm(8, c))

    A factory with a placement (a ``bnlab.norms`` option with ``slots`` other than ``all``:
    ``conv``, ``first``, a list of module paths) places itself among the batch-norm layers,
    which are the slots here (in module order; ``conv`` means the BatchNorm2d layers), and its
    ``rest`` option fills the others::

        model = replace_batchnorm(resnet, load_option("norm", "dbn", slots="first"))  # DBN-L1

    Other layers, norms of other kinds included, are left as they are (a mixed model stays
    mixed), and no bias is added or removed.

    The new layer is built on the old one's device and dtype, in its training mode, and gets the
    old one's tensors that it has under the same name and shape (γ, β, and for Batch Renorm and
    Ghost BN the running statistics too; Decorrelated BN keeps its identity whitening). Children
    are replaced in place and the (possibly new) root is returned, as in
    :func:`convert_batchnorm`. Uninitialized lazy layers and BatchNorm3d are left alone.
    """
    targets = [(name, m) for name, m in module.named_modules() if type(m) in _DIMS]
    factories = [factory] * len(targets)
    if getattr(factory, "slots", "all") != "all":
        factories = factory.for_slots(  # type: ignore[attr-defined]
            [name for name, _ in targets], [_DIMS[type(m)] == 2 for _, m in targets])
    per_layer = {id(m): f for (_, m), f in zip(targets, factories, strict=True)}

    def swap(old: nn.Module) -> nn.Module | None:
        dims = _DIMS.get(type(old))
        if dims is None:
            return None
        tensors = [*old.parameters(), *(b for b in old.buffers() if b.is_floating_point())]
        new = per_layer[id(old)](old.num_features, dims)  # type: ignore[arg-type]
        if tensors:
            new = new.to(device=tensors[0].device, dtype=tensors[0].dtype)
        own = new.state_dict()
        shared = {k: v for k, v in old.state_dict().items()
                  if k in own and own[k].shape == v.shape}
        new.load_state_dict(shared, strict=False)
        return new.train(old.training)

    return _convert(module, swap, {})
