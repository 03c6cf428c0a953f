"""The ``model`` config group: one option class per ``model=<name>`` (its keys, with types and
ranges, and how it builds its model), and the library helpers ``norm_factory``/``build_model``.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from torch import nn

from bnlab.errors import UsageError
from bnlab.models.convnets import cnn, plain, vgg
from bnlab.models.init import init_weights
from bnlab.models.placement import build_placed
from bnlab.models.resnet import NORM_FREE_SCHEMES, ResNet
from bnlab.models.slots import NormFactory, find_slots, is_empty
from bnlab.registry import Option, load_option

Dropout = Annotated[float, Field(ge=0, lt=1, description="dropout rate, in [0, 1)")]
Width = Annotated[int, Field(ge=1, description="channels of the conv layers (the first stage's "
                             "for a ResNet, doubling per stage)")]


class ModelOption(Option):
    """Base of the ``model`` options: ``build(norm)`` makes the model with its norm slots filled
    as ``norm`` (and its placement, ``norm.slots``) says and its weights initialized by
    ``init``."""

    group: ClassVar[str] = "model"
    init: Literal["kaiming", "xavier", "torch"] = Field(
        description="weight init: kaiming (He, fan-in), xavier (Glorot), torch (defaults)")
    dropout: Dropout
    weight_std: Literal["none", "ws", "scaled"] = Field(
        description="weight standardization of every conv layer: none, ws (Qiao et al. 2019), "
        "scaled (Brock et al. 2021's Scaled WS, ReLU gain, learnable gain); linear layers "
        "are never standardized")

    def build(self, norm: NormFactory, num_classes: int = 10) -> nn.Module:
        model = build_placed(lambda slots: self.make(slots, num_classes), norm)
        self.check_slots(model)
        init_weights(model, self.init)
        return model

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def check_slots(self, model: nn.Module) -> None:
        """Raise ``UsageError`` if this option cannot take what fills the model's slots."""


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
                   num_classes, self.weight_std)


class VGGOption(ModelOption):
    """VGG-11/16 for 32×32 inputs."""

    hidden: int = Field(ge=1, description="width of the two hidden linear slots")
    conv_dropout: Dropout

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return vgg(self.name, norm, self.dropout, self.conv_dropout, self.hidden, num_classes,
                   self.weight_std)


class VGG11(VGGOption):
    name: Literal["vgg11"] = "vgg11"


class VGG16(VGGOption):
    name: Literal["vgg16"] = "vgg16"


class Plain(ModelOption):
    """A VGG-style net without skip connections: ``depth`` conv slots of ``width`` channels at
    32×32, global average pooling, the classifier (``bnlab.models.convnets.plain``)."""

    name: Literal["plain"] = "plain"
    depth: int = Field(ge=1, description="conv slots (the first takes the image)")
    width: Width

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return plain(norm, self.depth, self.width, self.dropout, num_classes, self.weight_std)


class ResNetFamily(ModelOption):
    """The CIFAR ResNets (``bnlab.models.resnet``) with a residual scheme."""

    width: Width
    residual: Literal["standard", "skipinit", "fixup", "nf"] = Field(
        description="residual scheme: standard, skipinit (De & Smith 2020), fixup (Zhang et "
        "al. 2019), nf (Brock et al. 2021's x + alpha·f(x/beta)); fixup and nf take no norm")
    alpha: float = Field(gt=0, description="nf: the branch scale α (a number > 0)")

    @field_validator("residual")
    @classmethod
    def _weight_std_fits(cls, residual: str, info: ValidationInfo) -> str:
        weight_std = info.data.get("weight_std")
        # Fixup's init rescales raw weights, which standardization would undo; NF's analysis
        # needs variance-preserving convs, which unscaled WS is not (it scales by the fan-in).
        allowed = {"fixup": ("none",), "nf": ("none", "scaled")}.get(residual)
        if allowed and weight_std not in allowed:
            raise PydanticCustomError(
                "residual_weight_std", "{residual} cannot take model.weight_std={weight_std} "
                "(allowed with {residual}: {allowed})",
                {"residual": residual, "weight_std": weight_std, "allowed": ", ".join(allowed)})
        return residual

    @property
    def blocks_per_stage(self) -> int:
        raise NotImplementedError

    def make(self, norm: NormFactory, num_classes: int) -> nn.Module:
        return ResNet(norm, self.blocks_per_stage, self.width, self.dropout, num_classes,
                      self.residual, self.weight_std, self.alpha)

    def check_slots(self, model: nn.Module) -> None:
        if self.residual not in NORM_FREE_SCHEMES:
            return
        filled = [f"{s.norm} ({type(model.get_submodule(s.norm)).__name__})"
                  for s in find_slots(model) if not is_empty(model.get_submodule(s.norm))]
        if filled:
            raise UsageError(
                f"model.residual={self.residual} trains without normalization, but norm slots "
                f"hold a norm: {', '.join(filled[:3])}{', ...' if len(filled) > 3 else ''}; "
                "allowed: norm=none (or norm.slots/norm.rest leaving every slot none)")


class ResNet20(ResNetFamily):
    """ResNet-20 for CIFAR-10 (He et al. 2016): 3 stages × ``blocks`` basic blocks."""

    name: Literal["resnet20"] = "resnet20"
    blocks: int = Field(ge=1, description="basic blocks per stage")

    @property
    def blocks_per_stage(self) -> int:
        return self.blocks


class ResNetDepth(ResNetFamily):
    """The CIFAR ResNet of ``depth`` = 6n+2 layers (He et al. 2016: 20, 32, 44, 56, 110)."""

    name: Literal["resnet"] = "resnet"
    depth: int = Field(ge=8, description="6n+2 for n basic blocks per stage: 8, 14, 20, 26, "
                       "32, 44, 56, 110, ...")

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, depth: int) -> int:
        if depth % 6 != 2:
            raise PydanticCustomError("depth", "must be 6n+2 (n basic blocks of 2 conv layers "
                                      "per stage, 3 stages, plus the stem and the classifier)")
        return depth

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


def norm_factory(name: str, **overrides: object) -> NormFactory:
    """The ``norm`` option ``name`` with its config file's defaults and ``overrides``."""
    return load_option("norm", name, **overrides)  # type: ignore[return-value]


def build_model(name: str, norm: NormFactory, **overrides: object) -> nn.Module:
    """The ``model`` option ``name`` (config-file defaults, ``overrides``) built with ``norm``."""
    option = load_option("model", name, **overrides)
    assert isinstance(option, ModelOption)
    return option.build(norm)
