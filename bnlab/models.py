"""CNN builders that take a norm factory and dropout rates.

Every model places its *norm slot* between a conv (or hidden linear) layer and the nonlinearity
after it, as in Ioffe & Szegedy (2015). A layer that feeds a norm carries no bias (the norm's β
replaces it); under ``norm=none`` the slot is an ``nn.Identity`` and the layer keeps its bias, so
the watched positions are the same modules whatever the norm is.

Dropout placement (rates are config values, 0 disables):

- ``cnn``: ``conv_dropout`` after each stage's pooling; ``dropout`` after the hidden linear
  layer's nonlinearity, before the classifier.
- ``vgg11``/``vgg16``: ``conv_dropout`` after each pooling; ``dropout`` after each of the two
  hidden linear layers' nonlinearities (as in the original VGG classifier).
- ``resnet20``: ``dropout`` before the final linear classifier (``conv_dropout`` is not used, as
  dropout inside residual blocks is not part of the architecture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from bnlab import nn as bnn
from bnlab.registry import Option, load_option

NormFactory = Callable[[int, int], nn.Module]
"""``factory(num_features, dims)`` returns the module for one norm slot; dims is 1 or 2; its
``has_norm`` attribute is False when the slot is empty (the feeding layer then keeps its bias).
A ``bnlab.norms`` option is such a factory."""

VGG_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


@dataclass(frozen=True)
class Slot:
    """One watched norm slot: ``layer`` feeds it (its output is the slot's input) and ``norm``
    is the slot module itself (its output is the input to the nonlinearity)."""

    layer: str
    norm: str


def _conv_block(cin: int, cout: int, norm: NormFactory) -> list[nn.Module]:
    has_norm = norm.has_norm  # type: ignore[attr-defined]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=not has_norm), norm(cout, 2),
            nn.ReLU(inplace=True)]


def _hidden_linear(fin: int, fout: int, norm: NormFactory, dropout: float) -> list[nn.Module]:
    has_norm = norm.has_norm  # type: ignore[attr-defined]
    layers = [nn.Linear(fin, fout, bias=not has_norm), norm(fout, 1), nn.ReLU(inplace=True)]
    return [*layers, nn.Dropout(dropout)] if dropout > 0 else layers


def _maybe_dropout(p: float) -> list[nn.Module]:
    return [nn.Dropout(p)] if p > 0 else []


class Classifier(nn.Module):
    """``features`` → flatten → ``classifier``; the shape shared by ``cnn`` and the VGGs."""

    def __init__(self, features: list[nn.Module], classifier: list[nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def cnn(norm: NormFactory, channels: Sequence[int] = (32, 64, 128), depth: int = 1,
        hidden: int = 256, dropout: float = 0.0, conv_dropout: float = 0.0,
        num_classes: int = 10) -> Classifier:
    """A small CIFAR CNN: stages of ``depth`` conv blocks, each stage ending in 2×2 max-pooling,
    then one hidden linear layer and the classifier."""
    features: list[nn.Module] = []
    cin = 3
    for cout in channels:
        for _ in range(depth):
            features += _conv_block(cin, cout, norm)
            cin = cout
        features += [bnn.MaxPool2d(2), *_maybe_dropout(conv_dropout)]
    side = 32 // 2 ** len(channels)
    classifier = [*_hidden_linear(cin * side * side, hidden, norm, dropout),
                  nn.Linear(hidden, num_classes)]
    return Classifier(features, classifier)


def vgg(name: str, norm: NormFactory, dropout: float = 0.0, conv_dropout: float = 0.0,
        hidden: int = 512, num_classes: int = 10) -> Classifier:
    """VGG-11/16 for 32×32 inputs (Simonyan & Zisserman 2015, as used on CIFAR-10 in the BN
    literature): the ImageNet conv stack, a 1×1 map after five poolings, two hidden layers."""
    features: list[nn.Module] = []
    cin = 3
    for item in VGG_LAYOUTS[name]:
        if item == "M":
            features += [bnn.MaxPool2d(2), *_maybe_dropout(conv_dropout)]
        else:
            features += _conv_block(cin, int(item), norm)
            cin = int(item)
    classifier = [*_hidden_linear(cin, hidden, norm, dropout),
                  *_hidden_linear(hidden, hidden, norm, dropout),
                  nn.Linear(hidden, num_classes)]
    return Classifier(features, classifier)


class BasicBlock(nn.Module):
    """Two 3×3 conv slots with an identity shortcut; a 1×1 conv slot when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        bias = not norm.has_norm  # type: ignore[attr-defined]
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm(cout, 2)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.norm2 = norm(cout, 2)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias),
                                          norm(cout, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20 for CIFAR-10 (He et al. 2016, Sec. 4.2): 3 stages × 3 blocks, 16/32/64 wide."""

    def __init__(self, norm: NormFactory, blocks: int = 3, width: int = 16,
                 dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=not norm.has_norm)  # type: ignore[attr-defined]
        self.norm = norm(width, 2)
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stages.append(BasicBlock(cin, cout, 2 if (i > 0 and b == 0) else 1, norm))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(torch.relu(self.norm(self.conv(x))))
        return self.fc(self.dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise conv/linear weights: ``kaiming`` (He et al. 2015: fan-in, so the forward
    signal keeps its scale through ReLU layers even without a norm),
    ``xavier`` (Glorot & Bengio 2010), or ``torch`` (PyTorch's defaults, left untouched)."""
    if scheme == "torch":
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def find_slots(model: nn.Module) -> list[Slot]:
    """The model's norm slots in forward order, each with the conv/linear layer that feeds it."""
    slots, last_layer = [], None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            last_layer = name
        elif getattr(module, "is_norm_slot", False) and last_layer is not None:
            slots.append(Slot(layer=last_layer, norm=name))
    return slots


Dropout = Annotated[float, Field(ge=0, lt=1, description="dropout rate, in [0, 1)")]


class ModelOption(Option):
    """Base of the ``model`` options: ``build(norm)`` makes the model with its norm slots filled
    by ``norm`` and its weights initialized by ``init``."""

    group: ClassVar[str] = "model"
    init: Literal["kaiming", "xavier", "torch"] = Field(
        description="weight init: kaiming (He, fan-in), xavier (Glorot), torch (defaults)")
    dropout: Dropout

    def build(self, norm: NormFactory, num_classes: int = 10) -> nn.Module:
        model = self.make(norm, num_classes)
        init_weights(model, self.init)
        return model

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        raise NotImplementedError


class CNN(ModelOption):
    """A small CIFAR CNN: stages of ``depth`` conv slots, 2×2 max-pooling after each stage, one
    hidden linear slot and the classifier."""

    name: Literal["cnn"] = "cnn"
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1, max_length=5, description="width of each stage (1 to 5 stages)")
    depth: int = Field(ge=1, description="conv slots per stage")
    hidden: int = Field(ge=1, description="width of the hidden linear slot")
    conv_dropout: Dropout

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return cnn(norm, self.channels, self.depth, self.hidden, self.dropout, self.conv_dropout,
                   num_classes)


class VGGOption(ModelOption):
    """VGG-11/16 for 32×32 inputs."""

    hidden: int = Field(ge=1, description="width of the two hidden linear slots")
    conv_dropout: Dropout

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return vgg(self.name, norm, self.dropout, self.conv_dropout, self.hidden, num_classes)


class VGG11(VGGOption):
    name: Literal["vgg11"] = "vgg11"


class VGG16(VGGOption):
    name: Literal["vgg16"] = "vgg16"


class ResNet20(ModelOption):
    """ResNet-20 for CIFAR-10 (He et al. 2016): 3 stages × ``blocks`` basic blocks."""

    name: Literal["resnet20"] = "resnet20"
    blocks: int = Field(ge=1, description="basic blocks per stage")
    width: int = Field(ge=1, description="channels of the first stage (doubling per stage)")

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return ResNet(norm, self.blocks, self.width, self.dropout, num_classes)


def norm_factory(name: str, **overrides: object) -> NormFactory:
    """The ``norm`` option ``name`` with its config file's defaults and ``overrides``."""
    return load_option("norm", name, **overrides)  # type: ignore[return-value]


def build_model(name: str, norm: NormFactory, **overrides: object) -> nn.Module:
    """The ``model`` option ``name`` (config-file defaults, ``overrides``) built with ``norm``."""
    option = load_option("model", name, **overrides)
    assert isinstance(option, ModelOption)
    return option.build(norm)
