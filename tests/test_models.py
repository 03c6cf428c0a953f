from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bnlab import nn as bnn
from bnlab.errors import UsageError
from bnlab.models import build_model, find_slots, norm_factory
from bnlab.registry import option_names
from bnlab.runtime import MALLOC_ENV, memory_format

TINY = {"cnn": {"channels": [4, 8], "hidden": 16}, "vgg11": {"hidden": 16},
        "vgg16": {"hidden": 16}, "resnet20": {"width": 4, "blocks": 1},
        "resnet": {"width": 4, "depth": 8}, "plain": {"width": 4, "depth": 3}}
SLOTS = {"cnn": 3, "vgg11": 10, "vgg16": 15, "resnet20": 1 + 3 * 2 + 2, "resnet": 1 + 3 * 2 + 2,
         "plain": 3}


@pytest.mark.parametrize("name", option_names("model"))
@pytest.mark.parametrize("norm", ["torch", "none"])
def test_every_model_classifies_cifar_shaped_input(name, norm):
    model = build_model(name, norm_factory(norm), **TINY[name])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", option_names("model"))
def test_norm_slot_sits_between_layer_and_nonlinearity_and_positions_match(name):
    with_bn = build_model(name, norm_factory("torch"), **TINY[name])
    without = build_model(name, norm_factory("none"), **TINY[name])
    slots = find_slots(with_bn)
    assert slots == find_slots(without)  # the same watched positions whatever the norm
    assert len(slots) == SLOTS[name]
    modules = dict(with_bn.named_modules())
    for slot in slots:
        layer, norm = modules[slot.layer], modules[slot.norm]
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        assert isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d))
        assert layer.bias is None  # β of the norm replaces it
        assert norm.num_features == layer.weight.shape[0]
        assert isinstance(dict(without.named_modules())[slot.norm], nn.Identity)
        assert dict(without.named_modules())[slot.layer].bias is not None


def test_cnn_block_order_is_conv_norm_relu():
    model = build_model("cnn", norm_factory("torch"), channels=[4], hidden=8)
    kinds = [type(m) for m in model.features]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, bnn.MaxPool2d]  # (an nn.MaxPool2d)
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


def test_dropout_sits_where_documented():
    model = build_model("cnn", norm_factory("none"), channels=[4], hidden=8, dropout=0.5,
                        conv_dropout=0.2)
    assert [type(m) for m in model.features][-1] is nn.Dropout
    assert model.features[-1].p == 0.2
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.Identity, nn.ReLU, nn.Dropout,
                                                   nn.Linear]
    assert model.classifier[3].p == 0.5
    plain = build_model("cnn", norm_factory("none"), channels=[4], hidden=8)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    resnet = build_model("resnet20", norm_factory("none"), width=4, blocks=1, dropout=0.3)
    assert isinstance(resnet.dropout, nn.Dropout) and resnet.dropout.p == 0.3


def test_cnn_depth_and_width_are_configurable():
    model = build_model("cnn", norm_factory("torch"), channels=[4, 8, 16], depth=2, hidden=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 4, 8, 8, 16, 16]


def test_init_schemes():
    torch.manual_seed(0)
    model = build_model("cnn", norm_factory("none"), init="kaiming", channels=[64], hidden=8)
    conv = model.features[0]
    fan_in = conv.weight[0].numel()
    assert abs(conv.weight.std().item() - (2 / fan_in) ** 0.5) < 0.02
    assert torch.all(conv.bias == 0)
    with pytest.raises(UsageError, match=r"model.init='he' is invalid: input should be 'kaiming'"):
        build_model("cnn", norm_factory("none"), init="he")


def test_unknown_names_are_usage_errors():
    with pytest.raises(UsageError, match=r"norm='batch' is unknown; allowed: custom, dbn, "
                                         r"evonorm_b0, evonorm_s0, frn, ghost"):
        norm_factory("batch")
    with pytest.raises(UsageError, match=r"model='vgg19' is unknown"):
        build_model("vgg19", norm_factory("none"))


@pytest.mark.parametrize(("setting", "device", "amp", "nhwc"), [
    ("auto", "cpu", False, True), ("auto", "cuda", False, False), ("auto", "cuda", True, True),
    ("auto", "mps", False, False), (False, "cpu", False, False), (True, "cuda", False, True)])
def test_channels_last_auto_is_nhwc_on_cpu_and_on_cuda_with_amp(setting, device, amp, nhwc):
    fmt = memory_format(OmegaConf.create({"channels_last": setting, "amp": amp}),
                        torch.device(device))
    assert fmt == (torch.channels_last if nhwc else torch.contiguous_format)


MMAPPED_BYTES = """
import ctypes, torch
from bnlab.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
keep_freed_memory()
before = mallinfo2().hblkhd
# 40 MiB: above the largest mmap threshold glibc allows (32 MiB), like a (128, 64, 32, 32)
# float32 activation plus allocator padding.
block = torch.empty(40 << 20, dtype=torch.uint8)
print(mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(**env: str) -> int:
    # A fresh process: in a long one, freed chunks could serve the block whatever the settings.
    clean = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    r = subprocess.run([sys.executable, "-c", MMAPPED_BYTES], env={**clean, **env},
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux")
                    or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 malloc statistics")
def test_large_activations_are_not_mmapped_so_their_pages_are_reused():
    assert _mmapped_bytes() == 0
    # With glibc's defaults (bnlab leaves malloc alone when it is configured) it is mmapped.
    assert _mmapped_bytes(GLIBC_TUNABLES="glibc.malloc.tcache_count=7") >= 40 << 20
