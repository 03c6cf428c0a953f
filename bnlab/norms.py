"""The ``norm`` config group: which layer fills a model's norm slots.

Each class is one option (``norm=<name>``), its schema (the keys of ``configs/norm/<name>.yaml``
with types and ranges) and the factory of its slot modules: ``option(num_features, dims)``
returns the module for a slot fed by a conv (``dims=2``) or a hidden linear layer (``dims=1``).
To add a norm: write the layer in ``bnlab/nn/``, a class here, and a YAML file
(docs/architecture.md).

Every option also says where it goes (:class:`NormOption`'s ``slots`` and ``rest``): in all of
a model's slots, or only in some (the conv slots, the first slot, a list of slot paths) with
the option ``rest`` in the others; ``bnlab.models.placement`` builds such a mixed model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal

from hydra.utils import get_class
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from bnlab.errors import UsageError
from bnlab.registry import Option, Schema, load_option, option_names

Eps = Annotated[float, Field(gt=0, description="added to the variance (a number > 0)")]
Momentum = Annotated[float | None, Field(
    ge=0, le=1, description="moving-average factor of the running statistics, in [0, 1]; "
    "null: cumulative average")]
GroupSize = Annotated[int, Field(ge=1, description="channels whitened together (the last group "
                                 "of a slot may be smaller)")]


SlotPaths = Annotated[list[str], Field(min_length=1)]


class NormOption(Option):
    """Base of the ``norm`` options: ``option(num_features, dims)`` makes one slot's module (an
    ``nn.Identity`` for ``none``: the layers before an empty slot keep their bias); ``slots``
    says which slots of a model take this option and ``rest`` which option the others take
    (``for_slots``). ``fast`` is a key of every option, so that a sweep over norms can set it;
    it reaches the layers that have an eager fast path (``fast_path``: bnlab's BN, noisy BN,
    Batch Renorm, Ghost BN, Group/Layer Norm, FRN, EvoNorm B0/S0) and means nothing for the
    others: torch's layers run torch's kernels, ``none`` has no layer, and decorrelated BN and
    IterNorm have one implementation, which is their reference."""

    group: ClassVar[str] = "norm"
    fast_path: ClassVar[bool] = True
    fast: bool = Field(description="eager fast paths (true/false; false: the reference code "
                       "runs, as under compile)")
    slots: Literal["all", "conv", "first"] | SlotPaths = Field(
        description="the slots this norm fills: all, conv (every slot a conv feeds), first "
        "(the first slot), or a list of slot paths (module paths of the slots)")
    rest: str = Field(description="the norm option, with its config file's defaults, in the "
                      "slots that norm.slots leaves out")

    @field_validator("rest")
    @classmethod
    def _known_option(cls, rest: str) -> str:
        names = option_names("norm")
        if rest not in names:
            raise PydanticCustomError("norm_option", "not a norm option ({names})",
                                      {"names": ", ".join(names)})
        return rest
    # Normalizes with the statistics of its own process's batch in training (so in a DDP run
    # every process needs a batch of 2 or more).
    per_process_batch: ClassVar[bool] = True

    def __call__(self, num_features: int, dims: int) -> nn.Module:
        slot = self.layer(num_features, dims)
        slot.is_norm_slot = True  # marks the slot for find_slots(), even when it is an Identity
        return slot

    def for_slots(self, paths: Sequence[str], conv_fed: Sequence[bool]) -> list[NormOption]:
        """The option of each slot of a model (``paths`` in forward order; ``conv_fed``: whether
        a conv feeds the slot): this one where ``slots`` places it, ``rest`` elsewhere."""
        if self.slots == "all":
            return [self] * len(paths)
        if self.slots == "conv":
            chosen = list(conv_fed)
        elif self.slots == "first":
            chosen = [i == 0 for i in range(len(paths))]
        else:
            unknown = [p for p in self.slots if p not in paths]
            if unknown:
                raise UsageError(f"norm.slots: {', '.join(unknown)} is not a norm slot of this "
                                 f"model; allowed: all, conv, first or a list of "
                                 f"{', '.join(paths)}")
            chosen = [p in self.slots for p in paths]
        rest = load_option("norm", self.rest)
        return [self if here else rest for here in chosen]  # type: ignore[misc]

    def layer(self, num_features: int, dims: int) -> nn.Module:
        raise NotImplementedError


class BatchNormOption(NormOption):
    """A batch norm with running statistics: ``eps`` and ``momentum`` as in torch."""

    eps: Eps
    momentum: Momentum
    classes: ClassVar[tuple[str, str]]  # the (1-d, 2-d) layer classes, as import paths

    def layer(self, num_features: int, dims: int) -> nn.Module:
        cls = get_class(self.classes[dims - 1])
        kwargs = {**self.layer_kwargs(), **({"fast": self.fast} if self.fast_path else {})}
        return cls(num_features, eps=self.eps, momentum=self.momentum, **kwargs)

    def layer_kwargs(self) -> dict:
        return {}


class Custom(BatchNormOption):
    """bnlab's from-scratch BatchNorm (``bnlab.nn.BatchNorm1d/2d``, hand-derived backward)."""

    name: Literal["custom"] = "custom"
    classes = ("bnlab.nn.BatchNorm1d", "bnlab.nn.BatchNorm2d")


class Sync(BatchNormOption):
    """bnlab's from-scratch SyncBatchNorm (``bnlab.nn.SyncBatchNorm``): under data-parallel
    training every process normalizes with the statistics of the whole global batch; in a
    single process it is ``custom``."""

    name: Literal["sync"] = "sync"
    classes = ("bnlab.nn.SyncBatchNorm", "bnlab.nn.SyncBatchNorm")
    per_process_batch = False


class Torch(BatchNormOption):
    """``torch.nn.BatchNorm1d/2d``, the reference implementation."""

    name: Literal["torch"] = "torch"
    classes = ("torch.nn.BatchNorm1d", "torch.nn.BatchNorm2d")
    fast_path = False


class NoNorm(NormOption):
    """No normalization: the slot is an identity and the layers before it keep their bias.
    (``eps``/``momentum`` are kept so that sweeps over norms can set them for every option.)"""

    name: Literal["none"] = "none"
    eps: Eps
    momentum: Momentum
    fast_path = False
    per_process_batch = False

    def layer(self, num_features: int, dims: int) -> nn.Module:
        return nn.Identity()


class Noise(Schema):
    """Santurkar et al. (2018), Sec. 2.1: per layer and step mu_t ~ U(-mean_range, mean_range),
    sigma_t ~ U(std_range); per activation m ~ U(mu_t ± mean_jitter), s ~ N(sigma_t,
    std_jitter); a <- s·a + m."""

    mean_range: float = Field(ge=0, description="range of the per-step mean shift")
    std_range: list[float] = Field(min_length=2, max_length=2, description="[low, high] of "
                                   "the per-step scale, 0 <= low <= high")
    mean_jitter: float = Field(ge=0, description="per-activation jitter of the shift")
    std_jitter: float = Field(ge=0, description="per-activation std of the scale")

    @model_validator(mode="after")
    def _ordered(self) -> Noise:
        low, high = self.std_range
        if not 0 <= low <= high:
            raise ValueError(f"std_range={self.std_range} must be [low, high] with "
                             "0 <= low <= high")
        return self


class Noisy(BatchNormOption):
    """Custom BN followed by the noise of Santurkar et al. 2018 (training only)."""

    name: Literal["noisy"] = "noisy"
    noise: Noise
    classes = ("bnlab.nn.NoisyBatchNorm1d", "bnlab.nn.NoisyBatchNorm2d")

    def layer_kwargs(self) -> dict:
        return self.noise.model_dump()


class Renorm(BatchNormOption):
    """Batch Renormalization (Ioffe 2017): BN corrected towards the running statistics by
    r = clip(σ_B/σ, 1/r_max, r_max) and d = clip((μ_B − μ)/σ, −d_max, d_max)."""

    name: Literal["renorm"] = "renorm"
    r_max: float = Field(ge=1, description="clip of r (>= 1; 1 with d_max=0 is plain BN)")
    d_max: float = Field(ge=0, description="clip of d (>= 0)")
    warmup_steps: int = Field(ge=0, description="steps over which r_max relaxes from 1 and "
                              "d_max from 0 (the paper's warm-up); 0: none")
    classes = ("bnlab.nn.BatchRenorm1d", "bnlab.nn.BatchRenorm2d")

    def layer_kwargs(self) -> dict:
        return {"r_max": self.r_max, "d_max": self.d_max, "warmup_steps": self.warmup_steps}


class Ghost(BatchNormOption):
    """Ghost BN (Hoffer et al. 2017): each chunk of ``virtual_batch_size`` samples is normalized
    with its own statistics."""

    name: Literal["ghost"] = "ghost"
    virtual_batch_size: int = Field(ge=2, description="samples per virtual batch (>= 2)")
    classes = ("bnlab.nn.GhostBatchNorm1d", "bnlab.nn.GhostBatchNorm2d")

    def layer_kwargs(self) -> dict:
        return {"virtual_batch_size": self.virtual_batch_size}


class Group(NormOption):
    """Group Norm (Wu & He 2018): per sample, over groups of channels; no batch statistics."""

    name: Literal["group"] = "group"
    eps: Eps
    per_process_batch = False
    num_groups: int = Field(ge=1, description="groups of channels; must divide every slot's "
                            "channels")

    def layer(self, num_features: int, dims: int) -> nn.Module:
        if num_features % self.num_groups:
            raise UsageError(f"norm.num_groups={self.num_groups} does not divide a norm slot of "
                             f"{num_features} channels; choose a divisor of every slot's width")
        return get_class("bnlab.nn.GroupNorm")(self.num_groups, num_features, eps=self.eps,
                                               fast=self.fast)


class Layer(NormOption):
    """Layer Norm as used in CNNs: Group Norm with one group (each sample over C, H, W)."""

    name: Literal["layer"] = "layer"
    eps: Eps
    per_process_batch = False

    def layer(self, num_features: int, dims: int) -> nn.Module:
        return get_class("bnlab.nn.GroupNorm")(1, num_features, eps=self.eps, fast=self.fast)


class Decorrelated(BatchNormOption):
    """Decorrelated BN (Huang et al. 2018): ZCA whitening of groups of channels."""

    name: Literal["dbn"] = "dbn"
    group_size: GroupSize
    whitening: ClassVar[str] = "zca"
    classes = ("bnlab.nn.DecorrelatedBatchNorm1d",
               "bnlab.nn.DecorrelatedBatchNorm2d")
    fast_path = False

    def layer_kwargs(self) -> dict:
        return {"group_size": self.group_size, "whitening": self.whitening}


class IterNorm(Decorrelated):
    """IterNorm (Huang et al. 2019): whitening by Newton iterations instead of an
    eigendecomposition."""

    name: Literal["iternorm"] = "iternorm"
    iterations: int = Field(ge=1, description="Newton iterations (>= 1)")
    whitening = "iter"

    def layer_kwargs(self) -> dict:
        return {**super().layer_kwargs(), "iterations": self.iterations}


class FilterResponse(NormOption):
    """Filter Response Normalization with its TLU (Singh & Krishnan 2020): each sample's channel
    divided by its root mean square over the map, then max(γx̂ + β, τ); no batch statistics."""

    name: Literal["frn"] = "frn"
    eps: float = Field(gt=0, description="the constant ε, or the lower bound of the learned one "
                       "(a number > 0)")
    learnable_eps: bool = Field(description="learn ε = eps + |ε_l| (the paper's choice for "
                                "1×1 maps and linear layers)")
    eps_init: float = Field(gt=0, description="the learned ε_l's initial value, with "
                            "learnable_eps (a number > 0)")

    def layer(self, num_features: int, dims: int) -> nn.Module:
        return get_class("bnlab.nn.FilterResponseNorm")(
            num_features, eps=self.eps, learnable_eps=self.learnable_eps, eps_init=self.eps_init,
            fast=self.fast)


class EvoB0(NormOption):
    """EvoNorm B0 (Liu et al. 2020): x / max(batch std, v·x + instance std) · γ + β; the batch
    variance has a running average for evaluation, as BN's."""

    name: Literal["evonorm_b0"] = "evonorm_b0"
    eps: Eps
    momentum: Momentum

    def layer(self, num_features: int, dims: int) -> nn.Module:
        return get_class("bnlab.nn.EvoNormB0")(num_features, eps=self.eps, momentum=self.momentum,
                                               fast=self.fast)


class EvoS0(NormOption):
    """EvoNorm S0 (Liu et al. 2020): x · σ(v·x) / group std · γ + β, each sample over groups of
    channels (as group norm); no batch statistics."""

    name: Literal["evonorm_s0"] = "evonorm_s0"
    eps: Eps
    groups: int = Field(ge=1, description="groups of channels; must divide every slot's channels")

    def layer(self, num_features: int, dims: int) -> nn.Module:
        if num_features % self.groups:
            raise UsageError(f"norm.groups={self.groups} does not divide a norm slot of "
                             f"{num_features} channels; choose a divisor of every slot's width")
        return get_class("bnlab.nn.EvoNormS0")(num_features, groups=self.groups, eps=self.eps,
                                               fast=self.fast)
