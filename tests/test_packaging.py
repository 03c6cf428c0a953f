"""The Hydra configs ship inside the wheel, so an installed bnlab finds them from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_carries_the_configs_and_they_compose(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("bnlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("train.yaml", "norm/custom.yaml", "probe/default.yaml",
                   "experiment/lr_stability.yaml", "hydra/launcher/slurm.yaml"):
        assert f"bnlab/configs/{config}" in names
    # every module of the source tree ships (a subpackage missing from pyproject's list doesn't)
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "bnlab").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:  # a wheel is a zip laid out as site-packages
        zf.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import bnlab; print(bnlab.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))
    r = subprocess.run([sys.executable, "-m", "bnlab.cli", "train", "--cfg", "job", "norm=none",
                        "experiment=dropout"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "name: none" in r.stdout and "epochs: 10" in r.stdout
