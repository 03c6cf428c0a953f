"""The depth models (``resnet`` of depth 6n+2, ``plain``), weight standardization as a model
option, and the residual schemes checked against their papers' rules: Fixup (Zhang et al.
2019), SkipInit (De & Smith 2020), NF-ResNets (Brock et al. 2021)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.errors import UsageError
from bnlab.models import (
    BasicBlock,
    FixupBlock,
    NFBlock,
    ResNet,
    build_model,
    find_slots,
    norm_factory,
)
from bnlab.nn import ScaledWSConv2d, WSConv2d
from bnlab.nn.weight_std import RELU_GAIN
from bnlab.registry import load_option

NONE = norm_factory("none")


def test_resnet_depth_is_six_n_plus_two_and_depth_20_is_resnet20():
    for depth, n in ((8, 1), (20, 3), (32, 5), (56, 9), (110, 18)):
        with torch.device("meta"):
            model = load_option("model", "resnet", depth=depth).make(norm_factory("torch"), 10)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(model.stages) == 3 * n
        # the stem and 2 per block, + the classifier (1×1 projections are not counted)
        assert len([c for c in convs if c.kernel_size == (3, 3)]) + 1 == depth
    torch.manual_seed(0)
    deep = build_model("resnet", norm_factory("custom"), depth=20)
    torch.manual_seed(0)
    twenty = build_model("resnet20", norm_factory("custom"))
    a, b = deep.state_dict(), twenty.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet20_keeps_its_modules():
    model = build_model("resnet20", norm_factory("torch"), width=4, blocks=1)
    expected = ["conv.weight", "norm"]
    for i, (cin, cout) in enumerate(((4, 4), (4, 8), (8, 16))):
        block = [f"stages.{i}.conv1.weight", f"stages.{i}.norm1", f"stages.{i}.conv2.weight",
                 f"stages.{i}.norm2"]
        if cin != cout:
            block += [f"stages.{i}.shortcut.0.weight", f"stages.{i}.shortcut.1"]
        expected += block
    expected += ["fc.weight", "fc.bias"]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = [k for e in expected for k in ([e] if e.endswith(("weight", "bias"))
                                          and not e.endswith("norm") else
                                          [f"{e}.{s}" for s in bn])]
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("depth", [7, 9, 21, 100])
def test_depth_not_six_n_plus_two_is_refused_in_one_line(depth):
    with pytest.raises(UsageError) as err:
        load_option("model", "resnet", depth=depth)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.depth={depth} is invalid")
    assert "6n+2" in message


@pytest.mark.slow
def test_resnet110_builds_and_trains_one_step_on_cpu():
    torch.manual_seed(0)
    model = build_model("resnet", norm_factory("custom"), depth=110)
    assert len(find_slots(model)) == 1 + 54 * 2 + 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # every weight got a gradient and a step


def test_plain_is_depth_conv_slots_of_one_width_at_full_resolution():
    model = build_model("plain", norm_factory("torch"), depth=64, width=8)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 64 == len(find_slots(model))
    assert convs[0].in_channels == 3 and all(c.out_channels == 8 for c in convs)
    assert all(c.in_channels == 8 for c in convs[1:])
    assert all(c.stride == (1, 1) and c.kernel_size == (3, 3) for c in convs)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    sides = []
    for conv in convs:
        conv.register_forward_hook(lambda m, i, out: sides.append(out.shape[-2:]))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert set(sides) == {torch.Size([32, 32])}  # the deepest layer still sees a 32×32 map


@pytest.mark.parametrize("name", ["cnn", "resnet", "plain"])
@pytest.mark.parametrize(("weight_std", "cls"), [("ws", WSConv2d), ("scaled", ScaledWSConv2d)])
def test_weight_std_standardizes_every_conv_and_no_linear_layer(name, weight_std, cls):
    tiny = {"cnn": {"channels": [4, 8], "hidden": 8}, "resnet": {"depth": 8, "width": 4},
            "plain": {"depth": 3, "width": 4}}[name]
    model = build_model(name, norm_factory("group", num_groups=2), weight_std=weight_std,
                        **tiny)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(c) is cls for c in convs)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    if weight_std == "scaled":  # the ReLU gain, except on the image
        assert convs[0].gamma == 1.0 and all(c.gamma == RELU_GAIN for c in convs[1:])
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# -- Fixup -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_fixup_init_follows_the_papers_rule(depth):
    """Zhang et al. 2019, Sec. 3: a standard init (He et al., fan-in), then the first conv of
    each of the L residual branches scaled by L^(-1/(2m-2)) (m = 2 layers per branch), the
    last conv of each branch and the classifier zero; scalar biases 0, multipliers 1."""
    branches = (depth - 2) // 2  # 3 stages × n blocks, n = (depth - 2) / 6
    option = load_option("model", "resnet", depth=depth, residual="fixup", width=4)
    torch.manual_seed(0)
    model = option.build(NONE)
    torch.manual_seed(0)
    standard = option.make(NONE, 10)  # the same modules, with He init done here
    with torch.no_grad():
        for m in standard.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    assert len(model.stages) == branches
    factor = branches ** -0.5
    for block, ref in zip(model.stages, standard.stages, strict=True):
        assert isinstance(block, FixupBlock)
        torch.testing.assert_close(block.conv1.weight, ref.conv1.weight * factor, rtol=1e-6,
                                   atol=0)
        assert block.conv1.weight.std() > 0 and torch.all(block.conv2.weight == 0)
        for conv in (block.conv1, block.conv2, *block.shortcut):
            assert not isinstance(conv, nn.Conv2d) or conv.bias is None
        if len(block.shortcut):  # the projection keeps the standard init
            assert torch.equal(block.shortcut[0].weight, ref.shortcut[0].weight)
        for bias in (block.bias1a, block.bias1b, block.bias2a, block.bias2b):
            assert bias.shape == () and bias.item() == 0 and bias.requires_grad
        assert block.scale.item() == 1 and block.scale.requires_grad
    assert torch.equal(model.conv.weight, standard.conv.weight) and model.conv.bias is None
    assert torch.all(model.fc.weight == 0) and torch.all(model.fc.bias == 0)
    assert model.bias1.item() == 0 and model.bias2.item() == 0


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_fixup_branches_output_zero_at_init(depth):
    torch.manual_seed(1)
    model = build_model("resnet", NONE, depth=depth, residual="fixup", width=4)
    branch_outputs = []
    for block in model.stages:
        block.branch_end.register_forward_hook(lambda m, i, out: branch_outputs.append(out))
    logits = model(torch.randn(3, 3, 32, 32))
    assert len(branch_outputs) == (depth - 2) // 2
    assert all(torch.all(out == 0) for out in branch_outputs)
    assert torch.all(logits == 0)


# -- SkipInit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["none", "custom"])
def test_skipinit_network_at_init_is_its_skip_path(norm):
    torch.manual_seed(2)
    model = build_model("resnet", norm_factory(norm), depth=14, residual="skipinit", width=4)
    gains = [block.branch_gain for block in model.stages]
    assert all(isinstance(b, BasicBlock) for b in model.stages)
    assert all(g.shape == () and g.item() == 0 and g.requires_grad for g in gains)
    x = torch.randn(5, 3, 32, 32)

    def skip_path_only(x: torch.Tensor) -> torch.Tensor:
        """The network with every residual branch removed."""
        h = torch.relu(model.norm(model.conv(x)))
        for block in model.stages:
            h = torch.relu(block.shortcut(h))
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
        return model.fc(h)

    model.eval()  # the same normalization statistics in both forwards
    with torch.no_grad():
        assert torch.equal(model(x), skip_path_only(x))
    model.train()
    model(x).sum().backward()
    assert all(g.grad is not None and g.grad != 0 for g in gains)  # the gains learn first
    assert all(torch.all(b.conv2.weight.grad == 0) for b in model.stages)


# -- NF-ResNets --------------------------------------------------------------------------------


def test_nf_blocks_scale_by_the_analytic_std_and_reset_at_projections():
    alpha = 0.3
    model = build_model("resnet", NONE, depth=20, residual="nf", weight_std="scaled",
                        alpha=alpha, width=4)
    assert all(isinstance(b, NFBlock) and b.alpha == alpha for b in model.stages)
    a2 = alpha ** 2
    # stage 1 (no projection): Var grows by α² per block from Var(x_0) = 1; stages 2 and 3
    # start with a projection, which resets it to 1 + α².
    expected_var = [1, 1 + a2, 1 + 2 * a2, 1 + 3 * a2, 1 + a2, 1 + 2 * a2, 1 + 2 * a2 + a2,
                    1 + a2, 1 + 2 * a2]
    assert [b.projects for b in model.stages] == [False] * 3 + [True, False, False] * 2
    assert [b.beta for b in model.stages] == pytest.approx([math.sqrt(v) for v in expected_var])


def test_nf_resnet_signal_variance_at_init_follows_the_analysis():
    torch.manual_seed(3)
    model = build_model("resnet", NONE, depth=20, residual="nf", weight_std="scaled")
    variances = []
    for block in model.stages:
        block.register_forward_hook(
            lambda m, i, out: variances.append(out.var((0, 2, 3)).mean().item()))
    with torch.no_grad():
        model(torch.randn(32, 3, 32, 32))
    last = model.stages[-1]  # an identity block: it adds α² to its input's variance
    predicted = [b.beta ** 2 for b in model.stages[1:]] + [last.beta ** 2 + last.alpha ** 2]
    assert variances == pytest.approx(predicted, rel=0.2)


def test_nf_block_output_is_alpha_branch_plus_skip():
    torch.manual_seed(4)
    block = NFBlock(4, 8, 2, NONE, "scaled", alpha=0.2, beta=1.5)
    x = torch.randn(2, 4, 8, 8)
    scaled = torch.relu(x) / 1.5
    branch = block.conv2(torch.relu(block.conv1(scaled)))
    torch.testing.assert_close(block(x), 0.2 * branch + block.shortcut(scaled))


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("residual", "norm", "placement"), [
    ("fixup", "custom", {}), ("fixup", "group", {"num_groups": 2}), ("nf", "torch", {}),
    ("nf", "none", {"slots": "first", "rest": "custom"}),
    ("fixup", "dbn", {"slots": ["stages.1.norm2"], "rest": "none", "group_size": 4})])
def test_norm_free_schemes_refuse_any_norm_in_any_slot(residual, norm, placement):
    with pytest.raises(UsageError) as err:
        build_model("resnet", norm_factory(norm, **placement), depth=8, width=4,
                    residual=residual)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.residual={residual} ")
    assert "allowed: norm=none" in message


def test_norm_free_schemes_take_a_placement_that_leaves_every_slot_empty():
    model = build_model("resnet", norm_factory("none", slots="first", rest="none"), depth=8,
                        width=4, residual="fixup")
    assert all(isinstance(model.get_submodule(s.norm), nn.Identity) for s in find_slots(model))


@pytest.mark.parametrize(("residual", "weight_std"), [("fixup", "ws"), ("fixup", "scaled"),
                                                      ("nf", "ws")])
def test_schemes_refuse_weight_standardization_they_cannot_take(residual, weight_std):
    with pytest.raises(UsageError) as err:
        load_option("model", "resnet", residual=residual, weight_std=weight_std)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"model.residual='{residual}' is invalid")
    assert f"weight_std={weight_std}" in message


def test_skipinit_takes_a_norm_and_weight_standardization():
    model = build_model("resnet", norm_factory("group", num_groups=2), depth=8, width=4,
                        residual="skipinit", weight_std="ws")
    assert isinstance(model, ResNet) and torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.slow
def test_a_residual_scheme_on_a_model_without_residuals_is_refused_in_one_line(tmp_path):
    from tests.cli import bnlab

    run_dir = tmp_path / "run"
    r = bnlab("train", "data=synthetic", "model=cnn", "model.residual=fixup",
              f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "'model.residual'" in r.stderr
    assert not run_dir.exists()
