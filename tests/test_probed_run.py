"""Probes inside a real `bnlab train` run: tags and steps in the event files, and the
read-only contract (a fully probed run ends bit-identical to an unprobed one)."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli import bnlab, metrics, scalars, tiny

# 10 steps per epoch × 2 epochs; probes every 5 steps so each kind fires several times.
PROBES = ("probe=full", "probe.act_every=5", "probe.hist_every=10", "probe.ics_every=5",
          "probe.landscape_every=5", "probe.white_every=5", "probe.bnstats_every=5",
          "probe.gram_every=5", "probe.scale_every=5", "probe.batch_size=20")


def run(tmp_path, root, name: str, *extra: str):
    run_dir = tmp_path / name
    r = bnlab("train", *tiny(root, "model.dropout=0.3", f"hydra.run.dir={run_dir}", *extra),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["custom", "torch", "none", "noisy", "renorm", "dbn"])
def test_probes_are_read_only_in_a_real_run(tmp_path, cifar_root, norm):
    off = run(tmp_path, cifar_root, "off", f"norm={norm}", "epochs=1", "probe=off")
    on = run(tmp_path, cifar_root, "on", f"norm={norm}", "epochs=1", *PROBES)
    fired = scalars(on)  # the new probes measured inside the steps compared here
    assert [s for s, _ in fired["white/offdiag_corr/features.1"]] == [0, 5, 10]
    assert [s for s, _ in fired["gram/erank/features.1"]] == [0, 5, 10]
    if norm != "none":
        assert [s for s, _ in fired["bnstats/mean_shift/features.1"]] == [0, 5, 10]
        assert [s for s, _ in fired["scale/angle_ratio/features.0"]] == [5, 10]
    a = torch.load(off / "checkpoint.pt", weights_only=True)
    b = torch.load(on / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # weights and BN buffers
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert scalars(off)["train/loss"] == scalars(on)["train/loss"]
    assert metrics(off)["history"] == metrics(on)["history"]


@pytest.mark.slow
def test_probe_tags_and_steps_read_back_from_the_event_files(tmp_path, cifar_root):
    run_dir = run(tmp_path, cifar_root, "on", "norm=custom", *PROBES)
    tags = scalars(run_dir)
    layers = ["features.0", "features.1", "features.4", "features.5", "classifier.0",
              "classifier.1"]  # cnn with 2 stages: conv/norm pairs, then the hidden linear
    for layer in layers:
        for measure in ("p15", "p50", "p85", "mean", "std"):
            assert [s for s, _ in tags[f"act/{measure}/{layer}"]] == [0, 5, 10, 15, 20]
        for measure in ("mean_shift", "std_ratio", "mean_shift_init", "std_ratio_init", "w1"):
            assert [s for s, _ in tags[f"drift/{measure}/{layer}"]] == [5, 10, 15, 20]
    for layer in ("features.0", "features.4", "classifier.0"):  # weights of the watched slots
        assert [s for s, _ in tags[f"ics/l2/{layer}"]] == [5, 10, 15, 20]
        cos = [v for _, v in tags[f"ics/cos/{layer}"]]
        assert all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in cos), cos  # float32 rounding near ±1
    for measure in ("loss_range", "grad_pred", "beta"):
        assert [s for s, _ in tags[f"landscape/{measure}"]] == [5, 10, 15, 20]
    for measure in ("offdiag_corr", "cond", "erank", "erank_frac"):
        assert [s for s, _ in tags[f"white/{measure}/features.1"]] == [0, 5, 10, 15, 20]
    for measure in ("mean_shift", "log_var_ratio"):
        assert [s for s, _ in tags[f"bnstats/{measure}/classifier.1"]] == [0, 5, 10, 15, 20]
    assert [s for s, _ in tags["grad/global_norm"]] == list(range(1, 21))
    assert "grad/norm/features.0.weight" in tags and "grad/nonfinite" in tags
    assert "opt/update_ratio/features.0.weight" in tags
    p15, p85 = dict(tags["act/p15/features.1"]), dict(tags["act/p85/features.1"])
    assert all(p15[s] <= p85[s] for s in p15)
    acc = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})
    acc.Reload()
    assert "act/hist/features.1" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("act/hist/features.1")] == [0, 10, 20]


@pytest.mark.slow
def test_an_unknown_probe_layer_is_refused_before_the_run_dir_is_made(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, "probe.layers=[no.such.layer]",
                             f"hydra.run.dir={run_dir}"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("error: probe.layers: 'no.such.layer' is not a watched position; "
                        "allowed: all, features.0, features.1, features.4, features.5, "
                        "classifier.0, classifier.1\n")
    assert not r.stdout  # no probe warnings: nothing was built
    assert not run_dir.exists() and not list(tmp_path.rglob("train.log"))
