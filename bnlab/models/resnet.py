"""CIFAR ResNets (He et al. 2016, Sec. 4.2) and their norm-free residual schemes.

ResNet-(6n+2): a 3×3 stem conv slot of ``width`` channels; 3 stages of n basic blocks (width,
2·width, 4·width channels; the first block of stages 2 and 3 halves the map with stride 2);
global average pooling and the linear classifier: 6n conv layers in blocks, the stem and the
classifier make 6n+2. A block whose shape changes has a 1×1 conv slot as its shortcut (He et
al.'s option B), every other block the identity.

**The structure of a block**, the same in every scheme (hooks rely on it): ``conv1``,
``norm1``, ``conv2``, ``norm2`` compute the residual branch; ``branch_end`` (an ``nn.Identity``)
receives the branch's output as it is added, after the scheme's scalars (``norm2``'s output is
the branch before them); ``shortcut`` (an ``nn.Sequential``, empty for the identity) outputs
the skip path; the block outputs their sum (through a ReLU in post-activation blocks). A
forward hook on ``branch_end``, on ``shortcut`` and on the block sees the branch, the skip path
and the block's output.

**Residual schemes** (``model.residual``):

- ``standard``: He et al.'s post-activation block,
  ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``.
- ``skipinit`` (De & Smith 2020, arXiv 2002.10444): the same with a learnable scalar
  ``branch_gain``, initialized to 0, multiplying the branch's output; at init every block is
  its skip path, ``relu(shortcut(x))``, and the network is the skip path alone.
- ``fixup`` (Zhang et al. 2019, arXiv 1901.09321, Sec. 3, and the authors' code): no norm, and
  instead a scalar bias (init 0) before each conv, linear layer and activation and a scalar
  multiplier ``scale`` (init 1) at the end of each branch, with bias-free convs:
  ``relu(scale · conv2(relu(conv1(x + bias1a) + bias1b) + bias2a) + bias2b
  + shortcut(x + bias1a))`` (the identity shortcut takes ``x``); ``bias1`` after the stem
  conv, ``bias2`` before the classifier. On top of the standard init (``model.init``): the
  first conv of each branch scaled by L^(−1/(2m−2)) = L^(−1/2) (L residual branches, m = 2
  layers per branch), the last conv of each branch and the classifier (weight and bias) 0, so
  every branch outputs 0 at init. The projection shortcuts keep the standard init, as in the
  authors' ImageNet code.
- ``nf`` (Brock et al. 2021, arXiv 2101.08692, Sec. 4, and DeepMind's ``nfnets``):
  Normalizer-Free pre-activation blocks, x_{l+1} = x_l + α·f(x_l/β_l). The branch input is
  ``relu(x)/β`` (= relu(x/β)), with β_l the expected std of x_l at init computed analytically:
  Var(x_0) = 1 after the stem; a block with an identity shortcut adds α² (its branch has unit
  variance at init), and a block with a projection shortcut, which takes the same ``relu(x)/β``
  as its branch, resets the variance to 1 + α² (DeepMind resets at each stage's first block,
  which always projects there; here the rule follows the projection, since this ResNet's first
  stage does not project). No ReLU after the sum; one ReLU after the last block. α is
  ``model.alpha`` (the paper's 0.2). The analysis assumes variance-preserving convs: Scaled WS
  (``model.weight_std=scaled``, the NF-ResNet) or He init (``none``, the paper's ablation).
  Unlike DeepMind's code, no zero-initialized SkipInit gain multiplies the branch, so at init
  the signal propagates as the α/β analysis predicts (``skipinit`` is the zero-gain scheme).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from bnlab.models.slots import NormFactory, conv_slot

RESIDUAL_SCHEMES = ("standard", "skipinit", "fixup", "nf")
NORM_FREE_SCHEMES = ("fixup", "nf")  # their init rules assume un-normalized branches


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.full((), value))


def _shortcut(cin: int, cout: int, stride: int, norm: NormFactory, weight_std: str,
              bias: bool | None = None) -> nn.Sequential:
    """The identity (an empty Sequential), or a 1×1 conv slot when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(*conv_slot(cin, cout, norm, weight_std, kernel_size=1, stride=stride,
                                    bias=bias))


class BasicBlock(nn.Module):
    """Two 3×3 conv slots with an identity shortcut; a 1×1 conv slot when the shape changes.
    ``skipinit``: SkipInit's ``branch_gain`` (a learnable scalar, 0 at init) ends the branch."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory,
                 weight_std: str = "none", skipinit: bool = False) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_slot(cin, cout, norm, weight_std, stride=stride)
        self.conv2, self.norm2 = conv_slot(cout, cout, norm, weight_std)
        self.shortcut = _shortcut(cin, cout, stride, norm, weight_std)
        self.branch_gain = _scalar(0.0) if skipinit else None
        self.branch_end = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        if self.branch_gain is not None:
            out = out * self.branch_gain
        return torch.relu(self.branch_end(out) + self.shortcut(x))


class FixupBlock(nn.Module):
    """Fixup's basic block (Zhang et al. 2019): bias-free convs, empty slots, the scalar biases
    ``bias1a`` (before conv1 and the projection), ``bias1b`` (before the first ReLU),
    ``bias2a`` (before conv2), ``bias2b`` (end of the branch) and the multiplier ``scale``."""

    layers_per_branch = 2  # Fixup's m

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.bias1a = _scalar(0.0)
        self.conv1, self.norm1 = conv_slot(cin, cout, norm, stride=stride, bias=False)
        self.bias1b, self.bias2a = _scalar(0.0), _scalar(0.0)
        self.conv2, self.norm2 = conv_slot(cout, cout, norm, bias=False)
        self.scale, self.bias2b = _scalar(1.0), _scalar(0.0)
        self.shortcut = _shortcut(cin, cout, stride, norm, "none", bias=False)
        self.branch_end = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x + self.bias1a
        out = torch.relu(self.norm1(self.conv1(shifted)) + self.bias1b)
        out = self.norm2(self.conv2(out + self.bias2a)) * self.scale + self.bias2b
        skip = self.shortcut(shifted if len(self.shortcut) else x)
        return torch.relu(self.branch_end(out) + skip)

    @torch.no_grad()
    def rescale_init(self, branches: int) -> None:
        """Fixup's rule on top of a standard init, for a network of ``branches`` branches."""
        m = self.layers_per_branch
        self.conv1.weight.mul_(branches ** (-1 / (2 * m - 2)))
        nn.init.zeros_(self.conv2.weight)  # the last layer of the branch


class NFBlock(nn.Module):
    """Brock et al.'s Normalizer-Free pre-activation block: ``alpha · branch(relu(x)/beta) +
    shortcut``, the projection shortcut on ``relu(x)/beta`` too (see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormFactory, weight_std: str,
                 alpha: float, beta: float) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv_slot(cin, cout, norm, weight_std, stride=stride)
        self.conv2, self.norm2 = conv_slot(cout, cout, norm, weight_std)
        self.shortcut = _shortcut(cin, cout, stride, norm, weight_std)
        self.branch_end = nn.Identity()
        self.alpha, self.beta = alpha, beta

    @property
    def projects(self) -> bool:
        return len(self.shortcut) > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = torch.relu(x) / self.beta
        out = torch.relu(self.norm1(self.conv1(scaled)))
        out = self.norm2(self.conv2(out)) * self.alpha
        return self.branch_end(out) + self.shortcut(scaled if self.projects else x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta:.6g}"


class ResNet(nn.Module):
    """A CIFAR ResNet (He et al. 2016, Sec. 4.2): 3 stages × ``blocks`` blocks, ``width``,
    2·``width``, 4·``width`` channels, depth 6·``blocks`` + 2 (ResNet-20: ``blocks=3``), with
    the residual scheme ``residual`` (see the module docstring)."""

    def __init__(self, norm: NormFactory, blocks: int = 3, width: int = 16,
                 dropout: float = 0.0, num_classes: int = 10, residual: str = "standard",
                 weight_std: str = "none", alpha: float = 0.2) -> None:
        super().__init__()
        if residual not in RESIDUAL_SCHEMES:
            raise ValueError(f"residual={residual!r}; allowed: {', '.join(RESIDUAL_SCHEMES)}")
        self.residual = residual
        fixup = residual == "fixup"
        self.conv, self.norm = conv_slot(3, width, norm, weight_std, after_relu=False,
                                         bias=False if fixup else None)
        if fixup:
            self.bias1 = _scalar(0.0)
        stages: list[nn.Module] = []
        cin, expected_var = width, 1.0  # NF: the variance of the blocks' input at init
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                if residual == "nf":
                    block = NFBlock(cin, cout, stride, norm, weight_std, alpha,
                                    beta=math.sqrt(expected_var))
                    expected_var = (1.0 if block.projects else expected_var) + alpha ** 2
                elif fixup:
                    block = FixupBlock(cin, cout, stride, norm)
                else:
                    block = BasicBlock(cin, cout, stride, norm, weight_std,
                                       skipinit=residual == "skipinit")
                stages.append(block)
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if fixup:
            self.bias2 = _scalar(0.0)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        if self.residual == "fixup":
            x = x + self.bias1
        if self.residual != "nf":  # NF blocks are pre-activation: each starts with its ReLU
            x = torch.relu(x)
        x = self.stages(x)
        if self.residual == "nf":
            x = torch.relu(x)
        x = self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        if self.residual == "fixup":
            x = x + self.bias2
        return self.fc(x)

    @torch.no_grad()
    def init_residual_branches(self) -> None:
        """Fixup's init rule, after the standard init (``init_weights`` calls it)."""
        if self.residual != "fixup":
            return
        for block in self.stages:
            block.rescale_init(branches=len(self.stages))  # one residual branch per block
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
