"""The models (``model=``): CIFAR conv nets that take a norm factory for their norm slots.

What lives where:

* ``slots.py``: the norm-slot convention (layer → slot → ReLU; a bias only before an empty
  slot), :class:`Slot`, :func:`find_slots`, the layers that feed slots (``conv_slot``, with
  ``model.weight_std``'s conv class).
* ``placement.py``: building a model whose slots hold different norms (``norm.slots``).
* ``convnets.py``: the feed-forward nets :func:`cnn`, :func:`vgg` (``vgg11``/``vgg16``) and
  :func:`plain` (for depth studies), with their dropout placement.
* ``resnet.py``: :class:`ResNet` (``resnet20``, ``resnet`` of depth 6n+2), its blocks
  (:class:`BasicBlock`, ``FixupBlock``, ``NFBlock``: the block structure hooks rely on) and
  the residual schemes (``model.residual``).
* ``init.py``: :func:`init_weights` (``model.init``, then Fixup's rule).
* ``options.py``: one option class per ``model=`` option (its keys and ``build``),
  :func:`norm_factory`, :func:`build_model`.
"""

from bnlab.models.convnets import Classifier, cnn, plain, vgg
from bnlab.models.init import init_weights
from bnlab.models.options import (
    CNN,
    VGG11,
    VGG16,
    ModelOption,
    Plain,
    ResNet20,
    ResNetDepth,
    ResNetFamily,
    VGGOption,
    build_model,
    norm_factory,
)
from bnlab.models.resnet import BasicBlock, FixupBlock, NFBlock, ResNet
from bnlab.models.slots import NormFactory, Slot, find_slots

__all__ = [
    "CNN",
    "VGG11",
    "VGG16",
    "BasicBlock",
    "Classifier",
    "FixupBlock",
    "ModelOption",
    "NFBlock",
    "NormFactory",
    "Plain",
    "ResNet",
    "ResNet20",
    "ResNetDepth",
    "ResNetFamily",
    "Slot",
    "VGGOption",
    "build_model",
    "cnn",
    "find_slots",
    "init_weights",
    "norm_factory",
    "plain",
    "vgg",
]
