"""The feed-forward conv nets (no skip connections): ``cnn``, ``vgg11``/``vgg16``, ``plain``.

Each is ``features`` → flatten → ``classifier`` (:class:`Classifier`), with conv → slot → ReLU
blocks (``slots.conv_slot``). The first conv takes the image; every other conv takes a ReLU's
output (through a pooling in ``cnn`` and the VGGs), which Scaled WS's gain assumes: a block is
built with ``after_relu`` unless it is the first of ``features``.

Dropout placement (rates are config values, 0 disables):

- ``cnn``: ``conv_dropout`` after each stage's pooling; ``dropout`` after the hidden linear
  layer's nonlinearity, before the classifier.
- ``vgg11``/``vgg16``: ``conv_dropout`` after each pooling; ``dropout`` after each of the two
  hidden linear layers' nonlinearities (as in the original VGG classifier).
- ``plain``: ``dropout`` before the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.models.slots import NormFactory, conv_slot, linear_slot

VGG_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


class Classifier(nn.Module):
    """``features`` → flatten → ``classifier``; the shape shared by ``cnn``, the VGGs and
    ``plain``."""

    def __init__(self, features: list[nn.Module], classifier: list[nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _conv_block(cin: int, cout: int, norm: NormFactory, weight_std: str,
                after_relu: bool) -> list[nn.Module]:
    conv, slot = conv_slot(cin, cout, norm, weight_std, after_relu=after_relu)
    return [conv, slot, nn.ReLU(inplace=True)]


def _hidden_linear(fin: int, fout: int, norm: NormFactory, dropout: float) -> list[nn.Module]:
    linear, slot = linear_slot(fin, fout, norm)
    return [linear, slot, nn.ReLU(inplace=True), *_maybe_dropout(dropout)]


def _maybe_dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


def cnn(norm: NormFactory, channels: Sequence[int] = (32, 64, 128), depth: int = 1,
        hidden: int = 256, dropout: float = 0.0, conv_dropout: float = 0.0,
        num_classes: int = 10, weight_std: str = "none") -> Classifier:
    """A small CIFAR CNN: stages of ``depth`` conv blocks, each stage ending in 2×2 max-pooling,
    then one hidden linear layer and the classifier."""
    features: list[nn.Module] = []
    cin = 3
    for cout in channels:
        for _ in range(depth):
            features += _conv_block(cin, cout, norm, weight_std, after_relu=bool(features))
            cin = cout
        features += [bnn.MaxPool2d(2), *_maybe_dropout(conv_dropout)]
    side = 32 // 2 ** len(channels)
    classifier = [*_hidden_linear(cin * side * side, hidden, norm, dropout),
                  nn.Linear(hidden, num_classes)]
    return Classifier(features, classifier)


def vgg(name: str, norm: NormFactory, dropout: float = 0.0, conv_dropout: float = 0.0,
        hidden: int = 512, num_classes: int = 10, weight_std: str = "none") -> Classifier:
    """VGG-11/16 for 32×32 inputs (Simonyan & Zisserman 2015, as used on CIFAR-10 in the BN
    literature): the ImageNet conv stack, a 1×1 map after five poolings, two hidden layers."""
    features: list[nn.Module] = []
    cin = 3
    for item in VGG_LAYOUTS[name]:
        if item == "M":
            features += [bnn.MaxPool2d(2), *_maybe_dropout(conv_dropout)]
        else:
            features += _conv_block(cin, int(item), norm, weight_std, after_relu=bool(features))
            cin = int(item)
    classifier = [*_hidden_linear(cin, hidden, norm, dropout),
                  *_hidden_linear(hidden, hidden, norm, dropout),
                  nn.Linear(hidden, num_classes)]
    return Classifier(features, classifier)


def plain(norm: NormFactory, depth: int = 16, width: int = 16, dropout: float = 0.0,
          num_classes: int = 10, weight_std: str = "none") -> Classifier:
    """A VGG-style net without skip connections for depth studies: ``depth`` conv blocks
    (3×3, stride 1, ``width`` channels; the first maps the 3 image channels to ``width``), all
    at the input's 32×32 resolution, then global average pooling and the linear classifier.

    There is no pooling inside the stack: every layer is the same map on the same grid, so a
    quantity measured per layer (signal variance, gradient norm, sample similarity) changes
    with depth alone and its per-layer growth rate can be fitted, and any depth works on
    32×32 inputs (VGG's five 2×2 poolings would leave no map after a few stages). The stem is
    the first conv block itself and the head has no hidden layer, so every slot is a conv
    slot of the same width."""
    features: list[nn.Module] = []
    cin = 3
    for _ in range(depth):
        features += _conv_block(cin, width, norm, weight_std, after_relu=bool(features))
        cin = width
    features.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(features, [*_maybe_dropout(dropout), nn.Linear(width, num_classes)])
