"""Per-slot placement (``norm.slots``, ``norm.rest``): the right layer in each slot with the
right bias, refusals, mixed models in probes, Precise BN and ``replace_batchnorm``, and sweeps
over placements through ``bnlab train`` and ``bnlab compare``."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import bnlab.nn as bnn
from bnlab.config import validate
from bnlab.errors import UsageError
from bnlab.models import build_model, find_slots, norm_factory
from bnlab.precise_bn import precise_bn_copy
from bnlab.probes.bnstats import running_stats_layers
from tests.cli import bnlab, metrics, tiny
from tests.test_probes import ALL_OFF, make_probes, sgd, tags, train
from tests.test_registry import compose_cfg

CNN = {"channels": [4, 8], "hidden": 8}  # slots features.1, features.5 (conv), classifier.1
DBN = "DecorrelatedBatchNorm"


def layout(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(slot path, slot class, whether the feeding layer has a bias) for every slot."""
    return [(s.norm, type(model.get_submodule(s.norm)).__name__,
             model.get_submodule(s.layer).bias is not None) for s in find_slots(model)]


@pytest.mark.parametrize(("slots", "expected"), [
    ("all", [DBN + "2d", DBN + "2d", DBN + "1d"]),
    ("conv", [DBN + "2d", DBN + "2d", "BatchNorm1d"]),
    ("first", [DBN + "2d", "BatchNorm2d", "BatchNorm1d"]),
    (["features.5", "classifier.1"], ["BatchNorm2d", DBN + "2d", DBN + "1d"]),
])
def test_each_slot_gets_the_placed_norm_or_the_rest(slots, expected):
    model = build_model("cnn", norm_factory("dbn", group_size=4, slots=slots), **CNN)
    assert layout(model) == [(path, cls, False) for path, cls in
                             zip(["features.1", "features.5", "classifier.1"], expected,
                                 strict=True)]
    assert type(model.get_submodule("features.5")).__module__.startswith("bnlab.nn")  # custom


@pytest.mark.parametrize(("norm", "slots", "empty"), [
    ("dbn", "first", [False, True, True]), ("dbn", "conv", [False, False, True]),
    ("none", "first", [True, False, False]), ("none", ["classifier.1"], [False, False, True])])
def test_a_layer_has_a_bias_exactly_where_its_own_slot_is_empty(norm, slots, empty):
    rest = "none" if norm != "none" else "custom"
    model = build_model("cnn", norm_factory(norm, slots=slots, rest=rest, group_size=4)
                        if norm == "dbn" else norm_factory(norm, slots=slots, rest=rest), **CNN)
    assert [(cls == "Identity", bias) for _, cls, bias in layout(model)] == \
        [(e, e) for e in empty]
    model(torch.randn(4, 3, 32, 32)).sum().backward()


def test_resnet_placements_first_and_a_list():
    model = build_model("resnet", norm_factory("dbn", group_size=4, slots="first"), depth=8,
                        width=4)
    kinds = [cls for _, cls, _ in layout(model)]
    assert kinds[0] == DBN + "2d" and kinds[1:] == ["BatchNorm2d"] * 8
    assert find_slots(model)[0].norm == "norm"  # the stem's slot
    picked = ["stages.1.shortcut.1", "stages.2.norm2"]
    model = build_model("resnet", norm_factory("layer", slots=picked, rest="none"), depth=8,
                        width=4)
    assert [(p, c) for p, c, _ in layout(model) if c != "Identity"] == [
        (p, "GroupNorm") for p in picked]
    # conv: every slot of a ResNet is fed by a conv
    model = build_model("resnet", norm_factory("layer", slots="conv", rest="none"), depth=8,
                        width=4)
    assert {c for _, c, _ in layout(model)} == {"GroupNorm"}


def test_slot_paths_are_checked_on_the_meta_build_of_validate():
    cfg = compose_cfg("model.channels=[4,8]", "model.hidden=8",
                      "norm.slots=[features.1,features.4,classifier]")
    assert list(cfg.norm.slots) == ["features.1", "features.4", "classifier"]  # Hydra's parse
    with pytest.raises(UsageError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("norm.slots: features.4, classifier is not a norm slot of this model; "
                       "allowed: all, conv, first or a list of features.1, features.5, "
                       "classifier.1")
    validate(compose_cfg("model.channels=[4,8]", "model.hidden=8",
                         "norm.slots=[features.5]"))


@pytest.mark.parametrize(("key", "value", "start"), [
    ("norm.rest", "batch", "norm.rest='batch' is invalid: not a norm option (custom, dbn"),
    ("norm.slots", "last", "norm.slots='last' is invalid: input should be 'all', 'conv' or"),
    ("norm.slots", [], "norm.slots=[] is invalid")])
def test_bad_placement_values_are_refused_in_one_line(key, value, start):
    cfg = compose_cfg()
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(UsageError) as err:
        validate(cfg)
    assert "\n" not in str(err.value) and str(err.value).startswith(start), str(err.value)


def test_rest_uses_its_config_files_defaults():
    model = build_model("cnn", norm_factory("custom", slots="first", rest="group"),
                        channels=[4, 8], hidden=8)
    groups = model.get_submodule("features.5")
    assert isinstance(groups, bnn.GroupNorm) and groups.num_groups == 4  # group.yaml's


# -- mixed models elsewhere --------------------------------------------------------------------


def mixed_model(rest: str = "custom", seed: int = 0) -> nn.Module:
    """DBN in the first slot, ``rest`` (BN, or empty slots) in the others."""
    torch.manual_seed(seed)
    return build_model("cnn", norm_factory("dbn", group_size=2, slots="first", rest=rest),
                       **CNN, dropout=0.5)


def test_replace_batchnorm_places_an_option_among_the_batchnorm_layers():
    user = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 8),
                         nn.BatchNorm1d(8), bnn.GroupNorm(2, 8))
    first = bnn.replace_batchnorm(user, norm_factory("dbn", group_size=2, slots="first"))
    assert [type(first[i]).__name__ for i in (1, 4, 8, 9)] == [
        DBN + "2d", "BatchNorm2d", "BatchNorm1d", "GroupNorm"]
    assert isinstance(first[4], bnn.BatchNorm2d)  # the rest: custom BN
    user = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 30 * 30, 8), nn.BatchNorm1d(8))
    conv = bnn.replace_batchnorm(user, norm_factory("layer", slots="conv", rest="none"))
    assert isinstance(conv[1], bnn.GroupNorm) and isinstance(conv[4], nn.Identity)
    user = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 30 * 30, 8), nn.BatchNorm1d(8))
    with pytest.raises(UsageError, match=r"norm.slots: 2 is not a norm slot of this model; "
                                         r"allowed: all, conv, first or a list of 1, 4$"):
        bnn.replace_batchnorm(user, norm_factory("dbn", slots=["2"]))


@pytest.mark.parametrize(("rest", "measured"), [
    ("custom", {"features.1": "whitening_dist", "features.5": "log_var_ratio",
                "classifier.1": "log_var_ratio"}),
    ("none", {"features.1": "whitening_dist"})])
def test_probes_measure_every_slot_of_a_mixed_model_and_stay_read_only(rest, measured):
    every = {**ALL_OFF, "act_every": 1, "white_every": 1, "bnstats_every": 1, "grad_every": 1}
    runs = []
    for probing in (False, True):
        model = mixed_model(rest)
        optimizer = sgd(model)
        probes = make_probes(model, optimizer, **every) if probing else None
        losses, said = train(model, optimizer, probes)
        runs.append((model, losses, said))
    (m0, l0, _), (m1, l1, said) = runs
    found = tags(said)
    slots = find_slots(m1)
    assert len(slots) == 3
    for slot in slots:  # activations and whiteness at every slot, whatever fills it
        for name in (slot.layer, slot.norm):
            assert {f"act/p50/{name}", f"white/erank/{name}"} <= found
    assert {t for t in found if t.startswith("bnstats/")} == {
        f"bnstats/{m}/{name}" for name, second in measured.items()
        for m in ("mean_shift", second)}
    assert all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True))
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_precise_bn_sets_population_statistics_in_each_layer_of_a_mixed_model():
    model = mixed_model()
    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3)]
    twin = precise_bn_copy(model, iter(batches), 3)
    assert list(running_stats_layers(twin)) == ["features.1", "features.5", "classifier.1"]
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in running_stats_layers(twin)}
    reference = precise_bn_copy(model, iter(batches[:1]), 1)  # a copy with the same weights
    for name in seen:
        reference.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach().double()))
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    for name, inputs in seen.items():
        values = torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1]) for x in inputs])
        layer = twin.get_submodule(name)
        torch.testing.assert_close(layer.running_mean.double(), values.mean(0), rtol=1e-5,
                                   atol=1e-6)
        if name != "features.1":
            torch.testing.assert_close(layer.running_var.double(), values.var(0), rtol=1e-4,
                                       atol=1e-6)
        else:
            expected = layer.whitening_from_covariance(torch.cov(values.T))
            torch.testing.assert_close(layer.running_whitening.double(), expected.double(),
                                       rtol=1e-4, atol=1e-5)


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_over_placements_trains_and_compares_as_separate_rows(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "norm=dbn", "norm.group_size=4", "epochs=1",
                                   "norm.slots=all,conv,first,[features.5]",
                                   "eval.precise_bn_batches=2", "probe.bnstats_every=5",
                                   "probe.white_every=5", f"hydra.sweep.dir={sweep}"),
              cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = {metrics(d)["config"]["norm_slots"]: d for d in sweep.iterdir() if d.is_dir()}
    assert set(runs) == {"all", "conv", "first", "features.5"}
    for slots, run_dir in runs.items():
        m = metrics(run_dir)
        assert m["status"] == "completed" and m["final_test_acc_precise_bn"] is not None
        assert m["config"]["norm_rest"] == (None if slots == "all" else "custom")
    r = bnlab("compare", str(sweep), "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert "norm_slots" in table["varying"]
    assert sorted(row["setting"]["norm_slots"] for row in table["settings"]) == [
        "all", "conv", "features.5", "first"]
    # a wrong path: one line, exit 2, no run dir
    run_dir = tmp_path / "bad"
    r = bnlab("train", *tiny(cifar_root, "norm.slots=[features.4]",
                             f"hydra.run.dir={run_dir}"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: norm.slots: features.4 is not a norm slot")
    assert not run_dir.exists()
