"""The signal measures (bnlab.signal): exact values on tiny tensors and nets, the gradient
growth with depth that Yang et al. (2019) predict, and the read-only contract of a measurement.
The command end to end is in test_signal_cli.py."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.models import build_model, find_slots, norm_factory
from bnlab.signal.collect import SignalRecorder, measure_batch
from bnlab.signal.measures import (
    angle,
    channel_moments,
    equilibrium_angle,
    gram_measures,
    sample_gram,
)
from bnlab.signal.positions import Position, gradient_layers, positions, residual_blocks
from bnlab.signal.report import loglinear_fit, signal_document

E1, E2, E3 = torch.eye(3, dtype=torch.float64).unbind(0)


def gram_of(*rows: torch.Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in gram_measures(sample_gram(torch.stack(rows))).items()}


# -- the measures --------------------------------------------------------------------------


def test_gram_of_two_equal_samples_and_one_orthogonal():
    """Rows e1, 2·e1, e2: G = [[1, 1, 0], [1, 1, 0], [0, 0, 1]] (cosines: the scale of a row
    does not count), eigenvalues 2, 1, 0."""
    gram = sample_gram(torch.stack([E1, 2 * E1, E2]))
    assert torch.equal(gram, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]],
                                          dtype=torch.float64))
    got = gram_of(E1, 2 * E1, E2)
    assert got["cos_sim"] == pytest.approx(2 / 6)           # G12 + G21 over N(N−1) = 6 pairs
    assert got["stable_rank"] == pytest.approx(5 / 4)       # (2² + 1²) / 2²
    # p = (2/3, 1/3): exp(−(⅔ log ⅔ + ⅓ log ⅓)) = 3 / 2^(2/3)
    assert got["erank"] == pytest.approx(3 / 2 ** (2 / 3))


def test_gram_of_orthonormal_and_collapsed_samples():
    assert gram_of(E1, E2, E3) == pytest.approx({"cos_sim": 0, "stable_rank": 3, "erank": 3})
    assert gram_of(E1, 3 * E1, 0.5 * E1) == pytest.approx(
        {"cos_sim": 1, "stable_rank": 1, "erank": 1})
    # opposite directions: cosine −1, still one direction
    assert gram_of(E1, -E1) == pytest.approx({"cos_sim": -1, "stable_rank": 1, "erank": 1})


def test_gram_zero_rows_and_non_finite_values():
    # a zero row has no direction: its cosines are 0, and G = diag(1, 0) has rank 1
    assert gram_of(E1, torch.zeros(3, dtype=torch.float64)) == pytest.approx(
        {"cos_sim": 0, "stable_rank": 1, "erank": 1})
    zeros = torch.zeros(3, dtype=torch.float64)
    assert all(math.isnan(v) for k, v in gram_of(zeros, zeros).items() if k != "cos_sim")
    bad = torch.tensor([math.nan, 0, 0], dtype=torch.float64)
    assert all(math.isnan(v) for v in gram_of(E1, bad).values())


def test_gram_flattens_each_sample_and_takes_the_first_samples():
    x = torch.zeros(4, 2, 1, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = x[1, 0, 0, 0] = 1.0  # samples 0 and 1 the same direction
    x[2, 1, 0, 1] = 5.0                  # sample 2 orthogonal to them
    x[3] = 1.0                           # not among the first three
    assert torch.equal(sample_gram(x, 3), sample_gram(torch.stack([E1, E1, E2])))
    assert sample_gram(x).shape == (4, 4)


def test_channel_moments():
    """Channel 0 holds 1, 3, 1, 3 (μ = 2, σ² = 1), channel 1 holds 0, 0, 2, 2 (μ = 1, σ² = 1)."""
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],
                      [[[1.0, 3.0]], [[2.0, 2.0]]]], dtype=torch.float64)  # (N=2, C=2, 1, 2)
    got = channel_moments(x)
    assert float(got["mean_sq"]) == pytest.approx((2**2 + 1**2) / 2)
    assert float(got["var"]) == pytest.approx(1.0)
    linear = torch.tensor([[1.0, -1.0], [3.0, 1.0]], dtype=torch.float64)  # (N, C)
    got = channel_moments(linear)
    assert float(got["mean_sq"]) == pytest.approx((4 + 0) / 2)
    assert float(got["var"]) == pytest.approx((1 + 1) / 2)


def test_angle_and_its_equilibrium():
    for theta in (0.3, 1e-4, 1e-9):
        before = torch.tensor([2.0, 0.0, 0.0])
        after = 3 * torch.tensor([math.cos(theta), math.sin(theta), 0.0])
        assert float(angle(before, after)) == pytest.approx(theta, rel=1e-6)
    assert float(angle(torch.eye(2), -torch.eye(2))) == pytest.approx(math.pi)
    assert math.isnan(float(angle(torch.zeros(3), torch.ones(3))))
    # the example: η = 0.1, λ = 5e-4, α = 0.9 gives about 0.0073 rad
    assert equilibrium_angle(0.1, 5e-4, 0.9) == pytest.approx(math.sqrt(1e-4 / 1.9))
    assert equilibrium_angle(0.1, 5e-4, 0.9) == pytest.approx(0.0073, abs=5e-5)


def test_loglinear_fit():
    x = [1, 2, 3, 4, 5]
    fit = loglinear_fit(x, [3 * 2.0 ** -v for v in x])
    assert fit.slope == pytest.approx(-math.log(2))
    assert fit.intercept == pytest.approx(math.log(3))
    assert fit.growth_toward_input == pytest.approx(2)
    assert fit.r2 == pytest.approx(1) and fit.points == 5
    # points without a positive finite y are left out; fewer than two left: no fit
    fit = loglinear_fit([1, 2, 3, 4], [4.0, 0.0, 1.0, math.inf])
    assert fit.points == 2 and fit.growth_toward_input == pytest.approx(2)
    assert loglinear_fit([1, 2], [1.0, -1.0]) is None


# -- positions and the Signal Propagation Plot ---------------------------------------------


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


class Block(nn.Module):
    """out = branch_end(2x) + shortcut(x) = 3x, with the parts bnlab's blocks have."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = Scale(2.0)
        self.branch_end = nn.Identity()
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_end(self.twice(x)) + self.shortcut(x)


def test_spp_of_a_block_by_hand():
    """The channel moments of test_channel_moments through out = 2x + x: the branch has
    variance 4, the skip path 1, the output 9 and squared mean 9 × 2.5."""
    model = nn.Sequential(Block(), Block())
    blocks = residual_blocks(model)
    assert [(b.name, b.branch, b.shortcut, b.index) for b in blocks] == [
        ("0", "0.branch_end", "0.shortcut", 1), ("1", "1.branch_end", "1.shortcut", 2)]
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],
                      [[[1.0, 3.0]], [[2.0, 2.0]]]], dtype=torch.float64)
    recorder = SignalRecorder(model, [Position("0", "block_output", 1)], blocks, samples=2)
    handles = recorder.attach()
    model(x)
    for handle in handles:
        handle.remove()
    at_positions, at_blocks = recorder.result()
    assert at_blocks["0"] == pytest.approx({"mean_sq": 22.5, "var": 9.0, "branch_var": 4.0,
                                            "skip_var": 1.0, "branch_skip_ratio": 4.0})
    # the second block sees 3x: every variance ×9, the ratio the same
    assert at_blocks["1"] == pytest.approx({"mean_sq": 202.5, "var": 81.0, "branch_var": 36.0,
                                            "skip_var": 9.0, "branch_skip_ratio": 4.0})
    # sample 0 = (1, 3, 0, 0), sample 1 = (1, 3, 2, 2): cos = 10 / (√10 · √18)
    cos = 10 / math.sqrt(10 * 18)
    assert at_positions[("block_output", "0")]["cos_sim"] == pytest.approx(cos)
    assert at_positions[("block_output", "0")]["mean_sq"] == pytest.approx(22.5)


def test_positions_of_the_models():
    torch.manual_seed(0)
    resnet = build_model("resnet20", norm_factory("custom"), width=4)
    blocks = residual_blocks(resnet)
    assert len(blocks) == 9
    assert (blocks[0].branch, blocks[0].shortcut) == ("stages.0.branch_end", "stages.0.shortcut")
    slots = find_slots(resnet)
    found = positions(resnet)
    assert [p for p in found if p.kind == "slot_input"] == [
        Position(s.layer, "slot_input", i) for i, s in enumerate(slots, 1)]
    assert [p.name for p in found if p.kind == "block_output"] == [b.name for b in blocks]
    assert gradient_layers(resnet) == [f"{s.layer}.weight" for s in slots]
    cnn = build_model("cnn", norm_factory("none"), channels=[4, 8], hidden=16)
    assert residual_blocks(cnn) == []
    assert gradient_layers(cnn) == ["features.0.weight", "features.4.weight",
                                    "classifier.0.weight"]


def resnet_spp(residual: str, norm: str, weight_std: str = "none") -> list[dict[str, float]]:
    torch.manual_seed(0)
    model = build_model("resnet", norm_factory(norm), depth=14, width=8, residual=residual,
                        weight_std=weight_std)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    blocks = residual_blocks(model)
    signal = measure_batch(model, x, y, positions(model), blocks, gradient_layers(model),
                           samples=8, seed=0)
    return [signal.blocks[b.name] for b in blocks]


def test_the_spp_of_the_residual_schemes_at_init():
    """What the schemes are built to do, seen through the SPP: SkipInit's branches are 0; a BN
    branch ends in a norm of unit variance (γ = 1), and the block output's variance grows
    within a stage and drops where a normalized projection shortcut starts the next (Brock et
    al. 2021, Fig. 1); an NF branch adds about α² = 0.04 of variance to a signal that keeps
    its scale."""
    skipinit = resnet_spp("skipinit", "custom")
    assert len(skipinit) == 6
    assert all(b["branch_var"] == 0 and b["branch_skip_ratio"] == 0 for b in skipinit)
    bn = resnet_spp("standard", "custom")
    assert all(b["branch_var"] == pytest.approx(1, abs=1e-3) for b in bn)
    stage_starts = (2, 4)  # blocks 3 and 5 (0-based 2, 4) project: their skip path is a BN
    assert all(bn[i]["skip_var"] == pytest.approx(1, abs=1e-3) for i in stage_starts)
    variance = [b["var"] for b in bn]
    assert [i for i in range(1, 6) if variance[i] < variance[i - 1]] == list(stage_starts)
    nf = resnet_spp("nf", "none", "scaled")
    assert all(0.5 * 0.04 < b["branch_var"] < 1.5 * 0.04 for b in nf)
    assert all(0.5 < b["var"] < 2 for b in nf)  # the signal keeps its scale without a norm


# -- gradients with depth (Yang et al. 2019) -------------------------------------------------


def mlp(norm: str, depth: int, width: int, relu: bool) -> nn.Module:
    """``depth`` × (linear → slot [→ ReLU]) → classifier, orthogonal weights, float64."""
    slot = norm_factory(norm)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width, bias=False), slot(width, 1),
                   *([nn.ReLU()] if relu else [])]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).double()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.orthogonal_(module.weight)
    return model


def gradient_norms(model: nn.Module, width: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, width, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    names = gradient_layers(model)
    signal = measure_batch(model, x, y, positions(model), [], names, samples=8, seed=0)
    return [signal.grad_norms[n] for n in names]


def test_an_orthogonal_linear_net_keeps_its_gradient_norm():
    """W_l orthogonal and no nonlinearity: ∂L/∂W_{l+1} = Q_{l+1} (∂L/∂W_l) Q_lᵀ, the same
    Frobenius norm at every layer."""
    torch.manual_seed(0)
    norms = gradient_norms(mlp("none", 12, 32, relu=False), 32)
    assert norms == pytest.approx([norms[0]] * 12, rel=1e-10)
    assert loglinear_fit(list(range(1, 13)), norms).growth_toward_input == pytest.approx(1)


def test_a_plain_bn_relu_net_has_gradients_growing_toward_the_input():
    """Yang et al. 2019: without skips, BN makes gradients explode toward the input at init
    (for ReLU, the squared norm by about π/(π − 1) per layer in the wide limit)."""
    torch.manual_seed(0)
    norms = gradient_norms(mlp("custom", 12, 64, relu=True), 64)
    assert all(a > b for a, b in itertools.pairwise(norms))  # monotone toward input
    fit = loglinear_fit(list(range(1, 13)), norms)
    assert 1.1 < fit.growth_toward_input < math.sqrt(math.pi / (math.pi - 1)) * 1.1
    assert fit.r2 > 0.95


# -- read-only, and the document -----------------------------------------------------------


def test_a_measurement_leaves_the_model_and_the_rng_as_they_were():
    torch.manual_seed(0)
    model = build_model("cnn", norm_factory("custom"), channels=[4, 8], hidden=16, dropout=0.5)
    model.eval()  # measured in train mode; the flag must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    rng = torch.get_rng_state()
    first = measure_batch(model, x, y, positions(model), residual_blocks(model),
                          gradient_layers(model), samples=4, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # BN normalized with the batch's statistics (train mode): its running mean moved and came
    # back, and a second measurement is the same to the bit
    again = measure_batch(model, x, y, positions(model), residual_blocks(model),
                          gradient_layers(model), samples=4, seed=3)
    assert again == first
    model.train()
    model(x)  # what the measuring forward did to the buffers before they were put back
    assert not torch.equal(model.state_dict()["features.1.running_mean"],
                           before["features.1.running_mean"])


def test_the_document_aggregates_over_measurements_and_fits_the_gradients():
    torch.manual_seed(0)
    model = mlp("custom", 6, 16, relu=True)
    gen = torch.Generator().manual_seed(0)
    where = positions(model), residual_blocks(model), gradient_layers(model)
    batches = [measure_batch(model, torch.randn(16, 16, dtype=torch.float64, generator=gen),
                             torch.randint(0, 10, (16,), generator=gen), *where, samples=8,
                             seed=i) for i in range(3)]
    doc = signal_document(batches, *where, config={"norm": "custom"}, settings={})
    first = doc["positions"][0]
    values = [b.positions[("slot_input", "0")]["cos_sim"] for b in batches]
    assert first["name"] == "0" and first["kind"] == "slot_input" and first["index"] == 1
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert first["cos_sim"] == pytest.approx({"mean": mean, "std": std, "n": 3})
    growth = [loglinear_fit(list(range(1, 7)), [b.grad_norms[n] for n in where[2]])
              .growth_toward_input for b in batches]
    fit = doc["gradients"]["fit"]
    assert fit["growth_per_layer"]["mean"] == pytest.approx(sum(growth) / 3)
    # the line through the mean log norms has the mean of the measurements' slopes
    assert math.exp(-fit["slope"]) == pytest.approx(
        math.exp(sum(math.log(g) for g in growth) / 3))
    assert doc["summary"]["grad_growth"] == fit["growth_per_layer"]
    assert doc["summary"]["cos_sim_deepest"] == doc["positions"][5]["cos_sim"]
    assert doc["blocks"] == [] and doc["summary"]["branch_skip_last_block"]["n"] == 0


def test_readme_documents_every_signal_key_and_configs_set_them():
    import yaml

    from bnlab.signal.command import SignalConfig, SignalOptions

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| `")]
    for key in SignalOptions.model_fields:
        assert any(row.startswith(f"| `signal.{key}` |") for row in rows), key
    shared = next(row for row in rows if row.startswith("| `seed`, `batch_size`"))
    for key in SignalConfig.model_fields:
        assert f"`{key}`" in shared, key
    config = yaml.safe_load((root / "configs" / "signal.yaml").read_text())
    assert set(config["signal"]) == set(SignalOptions.model_fields)
    assert set(SignalConfig.model_fields) <= set(config)


def test_compare_draws_signal_numbers_against_the_numeric_setting():
    from bnlab.analysis.runs import Run
    from bnlab.analysis.signal_figure import signal_figure
    from bnlab.analysis.summary import compare_runs, signal_numbers

    def run(norm: str, depth: int, growth: float) -> Run:
        summary = {"grad_growth": {"mean": growth, "std": 0.1, "n": 4}}
        doc = {"kind": "signal", "status": "completed", "summary": summary,
               "config": {"norm": norm, "model": "plain", "depth": depth, "seed": 0}}
        return Run(Path(f"/runs/{norm}{depth}"), "completed", metrics=doc, kind="signal")

    runs = [run(n, d, g) for n, d, g in [("custom", 8, 1.2), ("custom", 16, 1.3),
                                         ("none", 8, 1.0), ("none", 16, 0.9)]]
    comparison = compare_runs(runs, {r.path: signal_numbers(r) for r in runs}, "signal")
    assert comparison.keys == ["norm", "depth"]
    assert comparison.rows[0].stats["grad_growth"].mean == 1.2
    fig = signal_figure(comparison)
    (ax,) = [a for a in fig.axes if a.get_visible()]  # only grad_growth has values
    assert ax.get_xlabel() == "depth"
    assert [tuple(c.lines[0].get_ydata()) for c in ax.containers] == [(1.2, 1.3), (1.0, 0.9)]
    assert [tuple(c.lines[0].get_xdata()) for c in ax.containers] == [(8, 16), (8, 16)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["norm=custom", "norm=none"]
