"""The whiteness probe (``white/``): each measure against values computed by hand on small
tensors with exactly known covariances, then the probe in a model against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.models import find_slots
from bnlab.probes.whiteness import COND_CEILING, channel_covariance, whiteness
from tests.test_probes import ALL_OFF, make_probes, sgd, tiny_model

# Columns 1..7 of the 8×8 Sylvester-Hadamard matrix: ±1 entries, each of mean 0 and variance
# 1, pairwise orthogonal; channels built from them have exactly known covariances.
_H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
HADAMARD = torch.kron(torch.kron(_H2, _H2), _H2)[:, 1:]
A, B, C, D = HADAMARD.unbind(1)[:4]


def as_conv_activation(columns: list[torch.Tensor]) -> torch.Tensor:
    """Channels given as 8 values each -> an (N=2, C, H=2, W=2) activation holding them."""
    values = torch.stack(columns, 1)  # (8, C): one row per sample and position
    return values.reshape(2, 2, 2, -1).permute(0, 3, 1, 2)


def measures(x: torch.Tensor) -> dict[str, float]:
    return {k: float(v) for k, v in whiteness(channel_covariance(x)).items()}


def erank_of(eigenvalues: list[float]) -> float:
    p = np.array(eigenvalues) / sum(eigenvalues)
    p = p[p > 0]
    return math.exp(-(p * np.log(p)).sum())


def test_white_channels():
    x = as_conv_activation([A, B, C, D])
    assert torch.equal(channel_covariance(x), torch.eye(4, dtype=torch.float64))
    got = measures(x)
    assert got["offdiag_corr"] == 0
    assert got["cond"] == pytest.approx(1)
    assert got["erank"] == pytest.approx(4)
    assert got["erank_frac"] == pytest.approx(1)


def test_rank_deficient_channels():
    """Channels a, b, a + b: Σ = [[1, 0, 1], [0, 1, 1], [1, 1, 2]], eigenvalues 0, 1, 3
    (eigenvectors (1, 1, −1), (1, −1, 0), (1, 1, 2)); correlations 0, 1/√2, 1/√2."""
    got = measures(as_conv_activation([A, B, A + B]))
    assert got["offdiag_corr"] == pytest.approx(math.sqrt(2) / 3)
    assert got["cond"] == COND_CEILING  # singular
    # p = (1/4, 3/4): exp(−(¼ log ¼ + ¾ log ¾)) ≈ 1.7548
    assert got["erank"] == pytest.approx(math.exp(-(0.25 * math.log(0.25)
                                                    + 0.75 * math.log(0.75))))
    assert got["erank"] == pytest.approx(1.754765, rel=1e-6)
    assert got["erank_frac"] == pytest.approx(got["erank"] / 3)


def test_known_correlation_on_a_linear_slot():
    """(N, C) input: b′ = ½a + (√3/2)b has unit variance and correlation ½ with a:
    Σ = [[1, ½], [½, 1]], eigenvalues ½ and 3/2, condition number 3."""
    x = torch.stack([A, 0.5 * A + math.sqrt(0.75) * B], 1)
    got = measures(x)
    assert got["offdiag_corr"] == pytest.approx(0.5)
    assert got["cond"] == pytest.approx(3)
    assert got["erank"] == pytest.approx(erank_of([0.5, 1.5]))


def test_scaled_and_dead_channels():
    """Correlation ignores channel scales and leaves constant channels out; the condition
    number and effective rank see the dead channel as a direction of zero variance.
    Σ of (2a, 3b′) is [[4, 3], [3, 9]]: eigenvalues (13 ± √61)/2."""
    dead = torch.full((8,), 7.0, dtype=torch.float64)
    x = as_conv_activation([2 * A, dead, 3 * (0.5 * A + math.sqrt(0.75) * B)])
    got = measures(x)
    assert got["offdiag_corr"] == pytest.approx(0.5)
    assert got["cond"] == COND_CEILING
    eig = [(13 - math.sqrt(61)) / 2, (13 + math.sqrt(61)) / 2]
    assert got["erank"] == pytest.approx(erank_of(eig))
    assert got["erank_frac"] == pytest.approx(erank_of(eig) / 3)


def test_degenerate_activations_give_nan():
    constant = torch.ones(4, 3, 2, 2)
    assert all(math.isnan(v) for v in measures(constant).values())
    one_live = as_conv_activation([A, torch.zeros(8, dtype=torch.float64)])
    got = measures(one_live)
    assert math.isnan(got["offdiag_corr"])  # no pair of varying channels
    assert got["erank"] == pytest.approx(1)
    bad = as_conv_activation([A, B]).clone()
    bad[0, 0, 0, 0] = math.inf
    assert all(math.isnan(v) for v in measures(bad).values())


def test_covariance_of_a_channels_last_activation():
    x = torch.randn(4, 5, 3, 3)
    expected = torch.cov(x.double().transpose(0, 1).reshape(5, -1), correction=0)
    got = channel_covariance(x.contiguous(memory_format=torch.channels_last))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("norm", ["torch", "none"])
def test_probe_matches_numpy_on_the_watched_activations(norm):
    """One shared probe forward gives act/ and white/; the numbers equal numpy's on the
    activations the layers produced."""
    model = tiny_model(norm)
    probes = make_probes(model, sgd(model), **{**ALL_OFF, "act_every": 1, "white_every": 1})
    names = [n for s in find_slots(model) for n in (s.layer, s.norm)]
    seen: dict[str, torch.Tensor] = {}
    forwards = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, out.detach().clone())) for n in names]
    handles.append(model.register_forward_pre_hook(lambda m, a: forwards.append(1)))
    got = {t: float(v) for t, v in probes.start().scalars.items()}
    for h in handles:
        h.remove()
    assert len(forwards) == 1  # whiteness rides on the activation probe's forward
    assert {t.split("/")[0] for t in got} == {"act", "white"}
    for name, x in seen.items():
        values = np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, x.shape[1])
        cov = np.cov(values, rowvar=False, bias=True)
        corr = np.corrcoef(values, rowvar=False)
        eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
        off = ~np.eye(len(cov), dtype=bool)
        assert got[f"white/offdiag_corr/{name}"] == pytest.approx(np.abs(corr[off]).mean())
        cond = eig[-1] / max(eig[0], eig[-1] / COND_CEILING)
        assert got[f"white/cond/{name}"] == pytest.approx(cond, rel=1e-6)
        assert got[f"white/erank/{name}"] == pytest.approx(erank_of(list(eig)))
        assert got[f"white/erank_frac/{name}"] == pytest.approx(erank_of(list(eig)) / len(cov))


def test_whiteness_interval():
    model = tiny_model()
    probes = make_probes(model, sgd(model), **{**ALL_OFF, "white_every": 2})
    assert probes.start().scalars  # step 0
    assert not probes.after_step(1).scalars
    assert {t.split("/")[0] for t in probes.after_step(2).scalars} == {"white"}


def test_whiteness_of_a_linear_layer_output_in_a_model():
    """A linear map of white inputs: Σ = W Wᵀ exactly, whatever the model around it."""
    weight = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    layer = nn.Linear(3, 2, bias=False).double()
    layer.weight.data = weight
    x = torch.stack([A, B, C], 1)
    got = measures(layer(x).detach())
    # Σ = [[1, 1], [1, 2]]: correlation 1/√2, eigenvalues (3 ± √5)/2, condition (3+√5)/(3−√5)
    assert got["offdiag_corr"] == pytest.approx(1 / math.sqrt(2))
    assert got["cond"] == pytest.approx((3 + math.sqrt(5)) / (3 - math.sqrt(5)))
    assert got["erank"] == pytest.approx(erank_of([(3 - math.sqrt(5)) / 2,
                                                   (3 + math.sqrt(5)) / 2]))
