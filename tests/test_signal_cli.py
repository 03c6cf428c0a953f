"""``bnlab signal`` end to end: run dirs, a sweep through ``bnlab compare`` and ``bnlab plot``,
checkpoints, and bad input (one line, exit 2, no run dir)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.rundir import write_json
from bnlab.signal.command import build_model, read_checkpoint
from tests.cli import bnlab, digest

pytestmark = pytest.mark.slow

SMALL = ["data=synthetic", "batch_size=16", "signal.seeds=2", "signal.batches=2",
         "signal.samples=8", "threads=1"]
TINY = [*SMALL, "model.channels=[4,8]", "model.hidden=16"]  # model=cnn
RUN_FILES = {"signal.json", "spp.png", "gram.png", "gradients.png", "signal.log", ".hydra"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("signal")
    r = bnlab("signal", "-m", *TINY, "norm=custom,none", f"hydra.sweep.dir={root / 'sweep'}",
              cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "sweep", r.stdout


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir())


def test_a_sweep_writes_a_self_contained_run_dir_per_job(sweep):
    sweep_dir, stdout = sweep
    runs = job_dirs(sweep_dir)
    assert [r.name.rsplit("norm=", 1)[1].split(",")[0] for r in runs] == ["custom", "none"]
    for run_dir in runs:
        assert {p.name for p in run_dir.iterdir()} >= RUN_FILES
        doc = json.loads((run_dir / "signal.json").read_text())
        assert doc["kind"] == "signal" and doc["status"] == "completed"
        assert doc["settings"] == {"seeds": [0, 1], "batches": 2, "samples": 8,
                                   "batch_size": 16, "checkpoint": None}
        assert doc["config"]["model"] == "cnn" and doc["config"]["batch_size"] == 16
        # cnn: two conv slots and a hidden linear slot, each with input and output positions
        assert [(p["kind"], p["index"]) for p in doc["positions"]] == [
            (kind, i) for kind in ("slot_input", "slot_output") for i in (1, 2, 3)]
        inputs = [p for p in doc["positions"] if p["kind"] == "slot_input"]
        assert all(p["cos_sim"]["n"] == 4 for p in inputs)  # 2 seeds × 2 batches
        assert all("cos_sim" not in p and p["var"]["n"] == 4 for p in doc["positions"]
                   if p["kind"] == "slot_output")
        assert [g["name"] for g in doc["gradients"]["layers"]] == [
            "features.0.weight", "features.4.weight", "classifier.0.weight"]
        assert doc["blocks"] == []
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert config["signal"]["samples"] == 8
        growth = doc["summary"]["grad_growth"]["mean"]
        assert f"gradient growth ×{growth:.3g}/layer toward the input" in stdout
    assert f"compare: bnlab compare {sweep_dir}" in stdout


def test_compare_tabulates_a_signal_sweep(sweep):
    sweep_dir, _ = sweep
    r = CliRunner().invoke(app, ["compare", str(sweep_dir), "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["norm"] for row in rows] == ["custom", "none"]
    assert "final_test_acc_mean" not in rows[0] and "n_diverged" not in rows[0]
    for row, run_dir in zip(rows, job_dirs(sweep_dir), strict=True):
        summary = json.loads((run_dir / "signal.json").read_text())["summary"]
        for key in ("grad_growth", "cos_sim_deepest", "stable_rank_deepest", "erank_deepest"):
            assert float(row[f"{key}_mean"]) == pytest.approx(summary[key]["mean"])
            assert float(row[f"{key}_std"]) == pytest.approx(summary[key]["std"])
            assert int(row[f"{key}_n"]) == 4
    assert "No numeric setting varies: no signal figure." in r.stderr  # only norm varies
    table = CliRunner().invoke(app, ["compare", str(sweep_dir)])
    assert table.exit_code == 0, table.output
    assert "grad growth /layer" in table.stdout and "stable rank (deepest)" in table.stdout
    assert "branch/skip" not in table.stdout  # no residual blocks: the column is left out


def test_plot_overlays_signal_runs(sweep):
    sweep_dir, _ = sweep
    out = sweep_dir / "overlay.png"
    r = CliRunner().invoke(app, ["plot", *map(str, job_dirs(sweep_dir)), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listing = CliRunner().invoke(app, ["plot", *map(str, job_dirs(sweep_dir)), "--list"])
    assert "norm=custom: bnlab signal, 6 positions, 0 residual blocks, 3 gradient layers" \
        in listing.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bnlab train run (in process: the same code path as the console, minus start-up)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    r = CliRunner().invoke(app, ["train", "data=synthetic", "model=resnet20", "model.width=4",
                                 "model.blocks=1", "epochs=1", "probe=off", "threads=1",
                                 f"hydra.run.dir={run_dir}"])
    assert r.exit_code == 0, r.output
    return run_dir


def test_a_trained_checkpoint_is_measured_with_its_model(tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["signal", *SMALL, "model=resnet20", "model.width=4",
                                 "model.blocks=1", f"signal.checkpoint={trained}",
                                 f"hydra.run.dir={run_dir}"])
    assert r.exit_code == 0, r.output
    doc = json.loads((run_dir / "signal.json").read_text())
    assert doc["settings"]["checkpoint"] == str(trained)
    assert [b["name"] for b in doc["blocks"]] == ["stages.0", "stages.1", "stages.2"]
    assert all(b["branch_skip_ratio"]["n"] == 4 for b in doc["blocks"])
    # what each seed measured: the checkpoint's weights, not that seed's init
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    state = torch.load(trained / "checkpoint.pt", weights_only=True)["model"]
    for seed in (0, 1):
        model = build_model(cfg, seed, torch.device("cpu"), read_checkpoint(trained))
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    at_init = build_model(cfg, 0, torch.device("cpu"), None).state_dict()
    assert not torch.equal(at_init["conv.weight"], state["conv.weight"])


BAD_INPUTS = [
    (["signal.samples=17"], r"signal.samples=17 is more than batch_size=16"),
    (["signal.seeds=0"], r"signal.seeds=0 is invalid: input should be greater than or equal"),
    (["optim.lr=0.1"], r"Could not override 'optim.lr'"),
    (["model.depth=0"], r"model.depth=0 is invalid"),
    (["model=resnet", "model.depth=21"], r"model.depth=21 is invalid: must be 6n\+2"),
    (["signal.checkpoint=/no/such/run"], r"signal.checkpoint=/no/such/run: no checkpoint.pt"),
    (["norm=group", "norm.num_groups=3"], r"norm.num_groups=3 does not divide"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=lambda a: str(a))
def test_bad_input_is_one_line_exit_2_and_writes_no_run_dir(tmp_path, monkeypatch, args,
                                                            message):
    monkeypatch.chdir(tmp_path)
    # (each fails in validation, before any model is built: the default cnn will do)
    r = CliRunner().invoke(app, ["signal", *SMALL, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    before = digest(trained)
    r = CliRunner().invoke(app, ["signal", *TINY, f"signal.checkpoint={trained}",
                                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: signal.checkpoint={trained} holds a checkpoint of "
                               "another model (model=resnet20 norm=custom; this config builds "
                               "model=cnn norm=custom: missing keys"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "run").exists()
    # the same family with another width: the shapes differ
    r = CliRunner().invoke(app, ["signal", *SMALL, "model=resnet20", "model.blocks=1",
                                 f"signal.checkpoint={trained}",
                                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.exit_code == 2 and "other shapes" in r.stderr, r.stderr
    assert digest(trained) == before


def test_a_sweep_with_one_bad_job_starts_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["signal", "-m", *TINY, "signal.samples=4,32",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: sweep job signal.samples=32: signal.samples=32 is more "
                               "than batch_size=16"), r.stderr
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def test_run_dirs_holding_a_run_are_refused(tmp_path, monkeypatch, trained):
    monkeypatch.chdir(tmp_path)
    done = tmp_path / "done"
    write_json(done / "signal.json", {"kind": "signal", "status": "completed"})
    (done / ".bnlab.lock").touch()  # as a run leaves it
    for run_dir, message in [(done, "already holds a signal measurement"),
                             (trained, "holds a bnlab train run")]:
        before = digest(run_dir)
        r = CliRunner().invoke(app, ["signal", *TINY, f"hydra.run.dir={run_dir}"])
        assert r.exit_code == 2 and message in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
        assert digest(run_dir) == before


def test_too_few_training_images_for_the_batches_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["signal", *TINY, "signal.batches=100",
                                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.exit_code == 2, r.output
    assert r.stderr == ("error: signal.batches=100 of batch_size=16 need 1600 training images; "
                        "the training set has 512\n")
