"""convert_batchnorm: swapping torch's and the custom batch-norm layers across a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab.nn as bnn
from bnlab.nn import convert_batchnorm

TORCH_TO_CUSTOM = {
    nn.BatchNorm1d: bnn.BatchNorm1d,
    nn.BatchNorm2d: bnn.BatchNorm2d,
    nn.BatchNorm3d: bnn.BatchNorm3d,
}


class Net(nn.Module):
    """Batch norms of every rank, nested in Sequential / ModuleList / ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
        self.heads = nn.ModuleList([nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)])
        self.extra = nn.ModuleDict({"bn1": nn.BatchNorm1d(6, momentum=None, bias=False)})
        self.conv3 = nn.Conv3d(1, 2, 1)
        self.bn3 = nn.BatchNorm3d(2, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.bn2(self.conv(x)))
        v = self.extra["bn1"](self.heads[1](self.heads[0](h.mean((2, 3)))))
        w = self.bn3(self.conv3(h[:, :1].unsqueeze(2)))
        return v.sum(1) + w.flatten(1).sum(1)


def run_step(model: nn.Module, x: torch.Tensor):
    out = model(x)
    grads = torch.autograd.grad(out.sum(), [p for p in model.parameters() if p.requires_grad])
    return out, grads


def bn_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if "BatchNorm" in type(m).__name__]


def test_round_trip_keeps_tensors_modes_and_outputs():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3, 5, 5)
    run_step(model, x)  # non-trivial running statistics
    model.body[1][1].eval()  # per-layer modes must survive
    model.extra["bn1"].weight.requires_grad_(False)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = [(n, type(m), m.training) for n, m in bn_layers(model)]
    ref_model = Net()
    ref_model.load_state_dict(state)
    ref_model.body[1][1].eval()
    ref_model.extra["bn1"].weight.requires_grad_(False)

    converted = convert_batchnorm(model, to="custom")
    assert converted is model  # root is not a BN: converted in place, same root returned
    after = [(n, type(m), m.training) for n, m in bn_layers(converted)]
    assert [(n, TORCH_TO_CUSTOM[t], tr) for n, t, tr in before] == after
    # The very same Parameter / buffer objects (optimizer references stay valid).
    for n, p in converted.named_parameters():
        assert p is params[n]
    for n, b in converted.named_buffers():
        assert b is buffers[n]
    assert not converted.extra["bn1"].weight.requires_grad
    assert converted.bn3.running_mean is None
    assert converted.extra["bn1"].momentum is None and converted.extra["bn1"].bias is None
    assert list(converted.state_dict()) == list(state)

    # Same function: outputs, grads and state updates match the untouched torch model.
    for training in (True, False):
        converted.train(training)
        ref_model.train(training)
        out, grads = run_step(converted, x)
        ref_out, ref_grads = run_step(ref_model, x)
        torch.testing.assert_close(out, ref_out)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[k], v, msg=k)

    back = convert_batchnorm(converted, to="torch")
    assert [(n, type(m)) for n, m in bn_layers(back)] == [(n, t) for n, t, _ in before]
    for n, p in back.named_parameters():
        assert p is params[n]


def test_root_batchnorm_returns_new_module():
    bn = nn.BatchNorm2d(3, momentum=0.3, eps=1e-3).double()
    bn.eval()
    out = convert_batchnorm(bn, to="custom")
    assert type(out) is bnn.BatchNorm2d and type(bn) is nn.BatchNorm2d
    assert out.weight is bn.weight and out.weight.dtype == torch.float64
    assert not out.training and out.momentum == 0.3 and out.eps == 1e-3
    assert repr(out).split("(", 1)[1] == repr(bn).split("(", 1)[1]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(out(x), bn(x))
    back = convert_batchnorm(out, to="torch")
    assert type(back) is nn.BatchNorm2d and back.running_var is bn.running_var


def test_device_meta_and_no_allocation():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).to("meta")
    out = convert_batchnorm(model, "custom")
    assert out[1].weight.device.type == "meta" and out[1].running_mean.device.type == "meta"


def test_shared_layer_stays_shared():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(bn, nn.ReLU(), bn)
    out = convert_batchnorm(model, "custom")
    assert type(out[0]) is bnn.BatchNorm1d and out[0] is out[2]


def test_noop_direction_and_untouched_layers():
    class MyBN(nn.BatchNorm2d):
        pass

    sync = bnn.SyncBatchNorm(3)
    noisy = bnn.NoisyBatchNorm2d(3)
    lazy = nn.LazyBatchNorm2d()
    mine = MyBN(3)
    custom = bnn.BatchNorm2d(3)
    model = nn.Sequential(sync, noisy, lazy, mine, custom)
    out = convert_batchnorm(model, "custom")
    assert out[0] is sync and out[1] is noisy and out[2] is lazy and out[3] is mine
    assert out[4] is custom  # already custom
    out = convert_batchnorm(model, "torch")
    assert out[1] is noisy and out[2] is lazy and out[3] is mine
    assert type(out[0]) is nn.SyncBatchNorm and type(out[4]) is nn.BatchNorm2d


def test_toggled_track_running_stats_is_carried_over():
    bn = nn.BatchNorm2d(3)
    bn.track_running_stats = False  # buffers exist, tracking off
    out = convert_batchnorm(bn, "custom")
    assert not out.track_running_stats and out.running_mean is bn.running_mean
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(out(x), bn(x))
    assert out.num_batches_tracked.item() == 0


@pytest.mark.parametrize("bad", ["Custom", "native", "", None, 1])
def test_invalid_target(bad):
    with pytest.raises(ValueError) as info:
        convert_batchnorm(nn.BatchNorm1d(2), to=bad)
    message = str(info.value)
    assert repr(bad) in message and "'custom'" in message and "'torch'" in message


def test_not_a_module():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert_batchnorm(torch.zeros(3), to="custom")
