"""Sweeps through Hydra's launcher plugins: joblib (parallel local) and submitit (local mode,
the same code path as the SLURM preset)."""

from __future__ import annotations

import pytest
import yaml

from tests.cli import bnlab, metrics, tiny

GRID = ("norm=torch,none",)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "local"])
def test_sweep_through_launcher_plugin_completes(tmp_path, cifar_root, launcher):
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "epochs=1", "probe=off", *GRID,
                                   f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}"),
              cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert len(runs) == 2
    for run_dir in runs:
        m = metrics(run_dir)
        assert m["status"] == "completed" and m["epochs_completed"] == 1
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"norm={m['config']['norm']}" in overrides
    assert {metrics(r)["config"]["norm"] for r in runs} == {"torch", "none"}


def test_parallel_launcher_splits_cores_between_jobs(tmp_path, cifar_root):
    r = bnlab("train", "--cfg", "hydra", "hydra/launcher=parallel", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "JoblibLauncher" in r.stdout and "n_jobs: 2" in r.stdout


def test_slurm_preset_composes_with_cluster_options(tmp_path):
    r = bnlab("train", "--cfg", "hydra", "hydra/launcher=slurm",
              "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    launcher = yaml.safe_load(r.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 30
    assert launcher["gpus_per_node"] == 1
