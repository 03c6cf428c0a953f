"""`bnlab curvature RUN_DIR` on a tiny real run that kept its epoch checkpoints, `bnlab plot
--curvature`, and the kept checkpoints themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bnlab import curvature as cv
from bnlab import data as datasets
from bnlab.analysis.plot import run_plot
from bnlab.curvature.command import Settings, run_curvature
from bnlab.errors import UsageError
from bnlab.rundir import clear_run_outputs, epoch_checkpoint, kept_epochs
from bnlab.runtime import memory_format
from bnlab.train import build
from tests.cli import bnlab, tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = Settings(k=3, iters=20, samples=4, runs=2, steps=8, batch_size=32, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar_root) -> Path:
    run_dir = tmp_path_factory.mktemp("curvature") / "run"
    r = bnlab("train", *tiny(cifar_root, "probe=off", "keep_epoch_checkpoints=true",
                             f"hydra.run.dir={run_dir}"), cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    return run_dir


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_one_checkpoint_kept_per_epoch_and_the_latest_where_it_was(run):
    assert kept_epochs(run) == [0, 1, 2]
    steps = [load(run / epoch_checkpoint(e))["progress"]["step"] for e in (0, 1, 2)]
    assert steps == [0, 10, 20]  # 100 images, batch 10
    latest, last = load(run / "checkpoint.pt"), load(run / epoch_checkpoint(2))
    assert all(torch.equal(v, last["model"][k]) for k, v in latest["model"].items())
    first, second = load(run / epoch_checkpoint(0)), load(run / epoch_checkpoint(1))
    assert not torch.equal(first["model"]["features.0.weight"],
                           second["model"]["features.0.weight"])


def test_overwrite_removes_the_kept_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for e in (0, 1, 12):
        (tmp_path / epoch_checkpoint(e)).write_bytes(b"x")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    assert kept_epochs(tmp_path) == [0, 1, 12]
    clear_run_outputs(tmp_path)
    assert kept_epochs(tmp_path) == [] and (tmp_path / "checkpoints" / "notes.txt").exists()


def measured_by_the_library(run: Path, epoch: int, bn: str, settings: Settings) -> dict:
    """The command's measures recomputed here from the run's files, by the library."""
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    device = torch.device("cpu")
    fmt = memory_format(cfg, device)
    model = build(cfg, device, fmt)
    model.load_state_dict(load(run / epoch_checkpoint(epoch))["model"])
    model.eval()
    data = datasets.load(cfg.data, device, cfg.seed)
    split = datasets.balanced_subset(data.train, settings.batch_size)
    x = datasets.normalize(split.images, data.mean, data.std).contiguous(memory_format=fmt)
    batches = [b.contiguous(memory_format=fmt) for b, _ in datasets.train_batches(
        data, cfg.batch_size, cfg.seed, epoch, 0, 0, cfg.data.augment)]
    kw = {"bn": bn, "population_batches": batches, "seed": settings.seed}
    return {
        "top": cv.top_eigenvalues(model, F.cross_entropy, x, split.labels, settings.k,
                                  settings.iters, settings.tol, **kw).tolist(),
        "trace": cv.trace(model, F.cross_entropy, x, split.labels, settings.samples, **kw),
    }


@pytest.mark.slow
@pytest.mark.parametrize("bn", ["batch", "population"])
def test_command_measures_the_chosen_checkpoint_and_statistics(run, tmp_path, bn):
    out = tmp_path / f"curv_{bn}.json"
    settings = Settings(**{**QUICK.__dict__, "epoch": 1, "bn": bn})
    result = run_curvature(run, settings, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert out.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    assert (result["epoch"], result["step"], result["bn"]) == (1, 10, bn)
    assert result["checkpoint"] == epoch_checkpoint(1)
    expected = measured_by_the_library(run, 1, bn, settings)
    assert result["top_eigenvalues"] == pytest.approx(expected["top"], rel=1e-5)
    assert (result["trace"]["estimate"], result["trace"]["stderr"]) == pytest.approx(
        expected["trace"], rel=1e-5)
    density = result["density"]
    assert torch.trapezoid(torch.tensor(density["density"]),
                           torch.tensor(density["grid"])).item() == pytest.approx(1, abs=1e-6)
    assert len(density["nodes"]) == 2 and 0 <= result["gradient_overlap"] <= 1


@pytest.mark.slow
def test_command_line_writes_into_the_run_dir_and_plot_overlays_runs(run, tmp_path):
    r = bnlab("curvature", str(run), "--k", "2", "--iters", "10", "--samples", "3",
              "--steps", "6", "--batch-size", "20", "--params", "features.0", "--threads",
              "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "top eigenvalues" in r.stderr and f"Wrote {run / 'curvature.json'}" in r.stderr
    result = json.loads((run / "curvature.json").read_text())
    assert result["params"] == ["features.0"] and result["epoch"] == 2
    assert result["dim"] == 3 * 4 * 9  # the first conv's weight, no bias before a norm
    other = tmp_path / "population.json"
    run_curvature(run, Settings(**{**QUICK.__dict__, "epoch": 0, "bn": "population"}), other)
    figure = tmp_path / "overlay.svg"
    run_plot([run, other], figure, curvature=True)
    svg = figure.read_text()
    assert "epoch 2, bn=batch, params features.0" in svg and "epoch 0, bn=population" in svg
    with pytest.raises(UsageError, match=r"no curvature.json in .*: run `bnlab curvature"):
        run_plot([tmp_path], tmp_path / "x.png", curvature=True)


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(run, tmp_path):
    r = bnlab("curvature", str(run), "--epoch", "7", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --epoch 7: ") and "(kept: 0, 1, 2)" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("change", "message"), [
    ({"epoch": 5}, r"--epoch 5: .* kept no checkpoint of epoch 5 \(kept: 0, 1, 2\)"),
    ({"k": 10**6}, r"--k 1000000 is larger than the number of parameters \(\d+\)"),
    ({"params": ["features.9"]}, r"params='features.9' is not a module path or parameter"),
    ({"bn": "eval"}, r"--bn 'eval' is invalid; allowed: batch, running, population"),
    ({"samples": 1}, r"samples=1 is invalid; allowed: an integer >= 2"),
])
def test_bad_settings(run, tmp_path, change, message):
    out = tmp_path / "c.json"
    with pytest.raises(UsageError, match=message):
        run_curvature(run, Settings(**{**QUICK.__dict__, **change}), out)
    assert not out.exists()


def test_run_dirs_without_what_is_needed(tmp_path):
    with pytest.raises(UsageError, match="no such run dir"):
        run_curvature(tmp_path / "nothing", QUICK)
    with pytest.raises(UsageError, match=r"not a run dir: .* \(no .hydra/config.yaml\)"):
        run_curvature(tmp_path, QUICK)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UsageError, match=r"has no checkpoint\.pt: the run saved no checkpoint"):
        run_curvature(tmp_path, QUICK)
    with pytest.raises(UsageError, match="kept none; train with keep_epoch_checkpoints=true"):
        run_curvature(tmp_path, Settings(epoch=1))


@pytest.mark.slow
def test_a_corrupt_checkpoint_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / ".hydra", copy / ".hydra")
    (copy / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match=r"cannot read .*checkpoint.pt: UnpicklingError"):
        run_curvature(copy, QUICK)
