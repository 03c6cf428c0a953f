"""Probes: the read-only contract, tags and intervals, config, checkpoints, non-finite values.

The numbers themselves (percentiles, drift, ICS, landscape, gradient norms) are checked against
direct computations in test_probe_metrics.py.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from bnlab.errors import UsageError
from bnlab.models import build_model, find_slots, norm_factory
from bnlab.probes import Measurements, Probes, validate_probe_cfg
from bnlab.probes.config import ProbeConfig
from bnlab.tracking import Tracker

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Every probe's intervals (a new probe's too): all at 1, or all off.
INTERVALS = [key for key in ProbeConfig.model_fields if key.endswith("_every")]
ALL_ON = {**dict.fromkeys(INTERVALS, 1), "landscape_points": 3, "hist_samples": 64,
          "batch_size": 8}
ALL_OFF = dict.fromkeys(INTERVALS, 0)


READ_ONLY_CASES = [("torch", "sgd", "fixed"), ("none", "sgd", "fixed"),
                   ("torch", "adam", "fixed"), ("custom", "sgd", "fixed"),
                   ("noisy", "sgd", "fixed"), ("noisy", "sgd", "step"),
                   ("renorm", "sgd", "fixed"), ("ghost", "sgd", "fixed"),
                   ("dbn", "sgd", "fixed"), ("group", "sgd", "fixed")]


def probe_cfg(**overrides: object) -> DictConfig:
    """configs/probe/default.yaml with ``overrides``."""
    return OmegaConf.merge(OmegaConf.load(CONFIGS / "probe" / "default.yaml"), overrides)


def tiny_model(norm: str = "torch", dropout: float = 0.0, conv_dropout: float = 0.0,
               seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", norm_factory(norm), channels=[4, 8], hidden=16, dropout=dropout,
                       conv_dropout=conv_dropout)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def make_probes(model: nn.Module, optimizer: torch.optim.Optimizer, **cfg: object) -> Probes:
    return Probes(probe_cfg(**cfg), model, optimizer, F.cross_entropy, batch(8, seed=99),
                  find_slots(model))


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                           weight_decay=5e-4)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, probes: Probes | None,
          steps: int = 3) -> tuple[list[torch.Tensor], list[tuple[int, Measurements]]]:
    """The training loop's calling sequence; returns the losses and what the probes said."""
    data = [batch(8, seed=step) for step in range(steps)]
    torch.manual_seed(123)  # the run's RNG: dropout and noisy BN draw from it
    losses, said = [], []
    if probes:
        said.append((0, probes.start()))
    for step, (x, y) in enumerate(data, 1):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if probes:
            said.append((step, probes.after_backward(step, x, y)))
        optimizer.step()
        if probes:
            said.append((step, probes.after_step(step)))
        losses.append(loss.detach())
    return losses, said


def tags(said: list[tuple[int, Measurements]]) -> set[str]:
    return {t for _, m in said for t in [*m.scalars, *m.histograms]}


# -- read-only -----------------------------------------------------------------------------


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return sgd(model)
    return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)


@pytest.mark.parametrize(("norm", "opt_name", "act_seed"), READ_ONLY_CASES)
def test_probes_leave_the_run_bit_identical(norm, opt_name, act_seed):
    runs = []
    for probing in (False, True):
        model = tiny_model(norm, dropout=0.5, conv_dropout=0.2)
        optimizer = _optimizer(opt_name, model)
        probes = make_probes(model, optimizer, **ALL_ON, act_seed=act_seed) if probing else None
        losses, said = train(model, optimizer, probes)
        runs.append((model, optimizer, losses, torch.get_rng_state(), said))
    (m0, o0, l0, rng0, _), (m1, o1, l1, rng1, said) = runs
    # the probed run really measured everything, each group at every step (bnstats: of
    # the layers with running statistics, which norm=none and Group Norm have not; scale: of
    # the weights before a batch-statistics norm, which they have not either)
    running_stats = norm not in ("none", "group")
    groups = {"act", "drift", "grad", "opt", "ics", "landscape", "white", "gram"}
    groups |= {"bnstats", "scale"} if running_stats else set()
    assert {t.split("/")[0] for t in tags(said)} == groups
    for group in groups & {"white", "bnstats", "gram"}:  # in the forward of every step's probe
        assert [s for s, m in said if any(t.startswith(f"{group}/") for t in m.scalars)] == \
            [0, 1, 2, 3]
    if running_stats:  # after each optimizer step
        assert [s for s, m in said if any(t.startswith("scale/") for t in m.scalars)] == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert sd0.keys() == sd1.keys()
    assert any("num_batches_tracked" in k for k in sd0) == running_stats
    for key in sd0:
        assert torch.equal(sd0[key], sd1[key]), key
    for p0, p1 in zip(m0.parameters(), m1.parameters(), strict=True):
        assert torch.equal(p0.grad, p1.grad)
    s0, s1 = o0.state_dict()["state"], o1.state_dict()["state"]
    assert s0.keys() == s1.keys()
    for i in s0:
        for k in s0[i]:
            assert torch.equal(torch.as_tensor(s0[i][k]), torch.as_tensor(s1[i][k])), (i, k)
    assert torch.equal(rng0, rng1)
    assert all(m.training for m in m1.modules())


def test_after_backward_keeps_the_grad_tensors_and_the_mode():
    model = tiny_model("torch", dropout=0.5)
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **ALL_ON)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    model.classifier[-1].bias.grad = None  # a parameter the loss did not reach
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: None if g is None else g.clone() for n, g in grads.items()}
    model.eval()
    probes.after_backward(1, x, y)
    for n, p in model.named_parameters():
        assert p.grad is grads[n], n  # the very same tensor object, or still None
        assert p.grad is None or torch.equal(p.grad, values[n]), n
    assert not any(m.training for m in model.modules())


# -- tags and intervals --------------------------------------------------------------------


def expected_tags(model: nn.Module) -> set[str]:
    slots = find_slots(model)
    layers = [n for s in slots for n in (s.layer, s.norm)]
    params = [n for n, _ in model.named_parameters()]
    act = {f"act/{m}/{n}" for m in ("p15", "p50", "p85", "mean", "std", "hist") for n in layers}
    drift = {f"drift/{m}/{n}" for n in layers
             for m in ("mean_shift", "std_ratio", "mean_shift_init", "std_ratio_init", "w1")}
    grad = {f"grad/norm/{p}" for p in params} | {"grad/global_norm", "grad/nonfinite"}
    opt = {f"opt/{m}/{p}" for m in ("weight_norm", "update_ratio") for p in params}
    ics = {f"ics/{m}/{s.layer}" for m in ("l2", "cos") for s in slots}
    landscape = {f"landscape/{m}" for m in ("loss_range", "grad_pred", "beta")}
    white = {f"white/{m}/{n}" for m in ("offdiag_corr", "cond", "erank", "erank_frac")
             for n in layers}
    bnstats = {f"bnstats/{m}/{s.norm}" for m in ("mean_shift", "log_var_ratio") for s in slots}
    gram = {f"gram/{m}/{n}" for m in ("cos_sim", "stable_rank", "erank") for n in layers}
    # (sgd() is Nesterov's: no equilibrium prediction, so no angle_ratio or angle_pred)
    scale = {f"scale/{m}/{s.layer}" for m in ("weight_norm", "eff_lr", "angle") for s in slots}
    return act | drift | grad | opt | ics | landscape | white | bnstats | gram | scale


def test_tags_follow_the_naming_scheme():
    model = tiny_model()
    optimizer = sgd(model)
    _, said = train(model, optimizer, make_probes(model, optimizer, **ALL_ON), steps=1)
    assert tags(said) == expected_tags(model)
    assert "act/p50/features.0" in said[0][1].scalars  # a slot input, tagged by its layer
    assert "act/p50/classifier.1" in said[0][1].scalars  # a slot output, tagged by the norm
    for _, m in said:
        assert all(isinstance(v, float) or v.dim() == 0 for v in m.scalars.values())
        assert all(v.dim() == 1 and v.numel() == 64 for v in m.histograms.values())


def test_nothing_is_measured_when_nothing_is_due():
    model = tiny_model()
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **ALL_OFF)
    _, said = train(model, optimizer, probes, steps=2)
    assert all(not m.scalars and not m.histograms for _, m in said)


def test_layers_selects_the_watched_positions():
    model = tiny_model()
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **{**ALL_ON, "layers": ["features.4",
                                                                  "classifier.1"]})
    _, said = train(model, optimizer, probes, steps=1)
    layers = {t.rsplit("/", 1)[1] for t in tags(said)
              if t.split("/")[0] in ("act", "drift", "white")}
    assert layers == {"features.4", "classifier.1"}
    norms = {t.rsplit("/", 1)[1] for t in tags(said) if t.startswith("bnstats/")}
    assert norms == {s.norm for s in find_slots(model)}  # every layer with running stats
    assert {t for t in tags(said) if t.startswith("ics/")} == {"ics/l2/features.4",
                                                              "ics/cos/features.4"}


def test_logged_tags_and_steps_read_back_from_the_event_file(tmp_path):
    model = tiny_model()
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, act_every=2, hist_every=4, grad_every=3,
                         ics_every=4, landscape_every=2, landscape_points=2, white_every=4,
                         bnstats_every=3, gram_every=4, gram_samples=8, scale_every=3)
    _, said = train(model, optimizer, probes, steps=4)
    tracker = Tracker(tmp_path)
    for step, m in said:
        tracker.scalars(m.scalars, step)
        tracker.histograms(m.histograms, step)
    tracker.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    logged = events.Tags()

    def steps(tag: str) -> list[int]:
        kind = "histograms" if tag.startswith("act/hist/") else "scalars"
        read = events.Histograms(tag) if kind == "histograms" else events.Scalars(tag)
        return [e.step for e in read]

    assert set(logged["scalars"]) | set(logged["histograms"]) == expected_tags(model)
    assert steps("act/p50/features.0") == [0, 2, 4]
    assert steps("act/hist/classifier.1") == [0, 4]
    assert steps("drift/w1/features.5") == [2, 4]
    assert steps("grad/norm/features.0.weight") == [3]
    assert steps("opt/update_ratio/classifier.3.bias") == [3]
    assert steps("ics/cos/classifier.0") == [4]
    assert steps("landscape/beta") == [2, 4]
    assert steps("white/erank/features.4") == [0, 4]
    assert steps("bnstats/mean_shift/classifier.1") == [0, 3]
    assert steps("gram/erank/features.5") == [0, 4]
    assert steps("scale/angle/classifier.0") == [3]


# -- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ({"act_every": -1}, "probe.act_every=-1 is invalid: input should be greater than or equal"),
    ({"grad_every": 1.5}, "probe.grad_every=1.5 is invalid: input should be a valid integer"),
    ({"white_every": -1}, "probe.white_every=-1 is invalid: input should be greater than"),
    ({"bnstats_every": "often"}, "probe.bnstats_every='often' is invalid"),
    ({"ics_every": True}, "probe.ics_every=True is invalid"),
    ({"enabled": "yes"}, "probe.enabled='yes' is invalid: input should be a valid boolean"),
    ({"batch_size": 1}, "probe.batch_size=1 is invalid: input should be greater than or"),
    ({"hist_samples": 0}, "probe.hist_samples=0 is invalid: input should be greater than"),
    ({"landscape_points": 1}, "probe.landscape_points=1 is invalid"),
    ({"gram_samples": 1}, "probe.gram_samples=1 is invalid: input should be greater than"),
    ({"scale_every": -2}, "probe.scale_every=-2 is invalid"),
    ({"act_every": 50, "hist_every": 75},
     "probe: hist_every=75 must be 0 or a multiple of act_every=50"),
    ({"act_every": 0, "hist_every": 10}, "probe: hist_every=10 must be 0 or a multiple"),
    ({"landscape_range": [4.0, 0.5]}, "probe: landscape_range=[4.0, 0.5] must be [low, high]"),
    ({"landscape_range": [0.0, 1.0]}, "probe.landscape_range=[0.0, 1.0] is invalid (item 0)"),
    ({"landscape_range": [1.0]}, "probe.landscape_range=[1.0] is invalid: list should have"),
    ({"layers": "some"}, "probe.layers='some' is invalid: input should be 'all' or"),
    ({"act_seed": "random"}, "probe.act_seed='random' is invalid: input should be 'fixed'"),
    ({"layers": ["features.1", "features.2"]},
     "probe.layers: 'features.2' is not a watched position; allowed: all, features.0, "
     "features.1, features.4, features.5, classifier.0, classifier.1"),
])
def test_bad_probe_values_are_usage_errors(override, message):
    model = tiny_model()
    with pytest.raises(UsageError) as err:
        make_probes(model, sgd(model), **override)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option", ["default", "off", "full"])
def test_probe_config_options_compose_and_validate(option):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=[f"probe={option}", "probe.act_every=20"])
    validate_probe_cfg(cfg.probe, find_slots(tiny_model()))
    assert set(cfg.probe) == set(probe_cfg())  # overrides of any key work under every option
    assert cfg.probe.act_every == 20
    assert cfg.probe.enabled == (option != "off")
    if option == "full":
        assert min(cfg.probe[k] for k in ("act_every", "hist_every", "grad_every",
                                          "ics_every", "landscape_every", "white_every",
                                          "bnstats_every")) > 0
    if option == "default":
        assert cfg.probe.ics_every == cfg.probe.landscape_every == 0  # the costly ones


# -- checkpoint ----------------------------------------------------------------------------


def test_drift_references_survive_a_checkpoint():
    model = tiny_model("none")
    optimizer = sgd(model)
    cfg = {**ALL_OFF, "act_every": 1}
    first = make_probes(model, optimizer, **cfg)
    first.start()
    with torch.no_grad():
        model.features[0].bias += 0.3
    first.after_step(1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make_probes(model, optimizer, **cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # as train.py loads it
    with torch.no_grad():
        model.features[0].weight *= 1.5
    a, b = first.after_step(2).scalars, resumed.after_step(2).scalars
    drift = [t for t in a if t.startswith("drift/")]
    assert len(drift) == 30 and set(a) == set(b)
    for tag in drift:
        assert torch.equal(a[tag], b[tag]), tag
    assert a["drift/mean_shift_init/features.0"] > a["drift/mean_shift/features.0"] > 0


# -- non-finite values ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_do_not_crash_the_probes(bad):
    model = tiny_model("torch")
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **ALL_ON)
    probes.start()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = bad
    _, said = train(model, optimizer, probes, steps=1)
    scalars = {t: float(v) for _, m in said for t, v in m.scalars.items()}
    assert math.isnan(scalars["act/p50/features.1"])  # BN of a channel with ±inf or NaN
    assert math.isnan(scalars["drift/w1/classifier.1"])
    assert 0 < scalars["grad/nonfinite"] <= 1
    assert not math.isfinite(scalars["grad/global_norm"])
    assert math.isnan(scalars["landscape/beta"])
    tracker_safe = [h for _, m in said for h in m.histograms.values()]
    assert tracker_safe and all(h.dim() == 1 for h in tracker_safe)
