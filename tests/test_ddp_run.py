"""``bnlab train`` under DDP: 2 CPU processes (gloo) started by torch's elastic launcher
(through ``dist.nproc=2``, and ``torchrun`` itself) and by the SLURM launcher's local mode.

- ``norm=sync`` on 2 processes ends as the 1-process run within float tolerance (probes and
  Precise BN, pooled over ranks, included);
- ``norm=custom`` on 2 processes (per-device BN) ends as ``norm=ghost`` with
  ``virtual_batch_size`` = the per-rank batch, running statistics included;
- only rank 0 writes; the SLURM launcher's 2 tasks are one DDP job; a SIGTERM stops both ranks
  at one step with one checkpoint, and the run resumed under torchrun ends bit-identical to the
  uninterrupted one (with dropout: every rank's RNG stream is restored), which was probed
  (probes on rank 0 are read-only);
- bad input is refused on every rank in one line, a run dir in use before any process starts.

The runs are few and tiny (process start-up is most of their time); each pair is one sweep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.rundir import run_dir_lock
from tests.cli import bnlab, metrics, scalars
from tests.test_resume import assert_same_run, wait_for_checkpoint

ARGS = ("data=synthetic", "data.train_size=480", "data.test_size=64", "epochs=3",
        "model.channels=[4,8]", "model.hidden=16", "threads=1")
PROBED = ("probe.act_every=5", "probe.grad_every=5", "probe.ics_every=10",
          "probe.bnstats_every=5", "eval.precise_bn_batches=2")
# A global batch of 64, 32 per rank: Ghost BN's default virtual batch (checked below).
PAIRS = ("batch_size=64", "model.dropout=0", *PROBED)


def sweep(folder: Path, *extra: str) -> dict[str, Path]:
    """One ``-m`` sweep over norms; its job dirs by norm."""
    r = bnlab("train", "-m", *ARGS, *PAIRS, *extra, f"hydra.sweep.dir={folder}",
              "hydra.sweep.subdir=${norm.name}", cwd=folder.parent, timeout=300)
    assert r.returncode == 0, r.stderr
    return {p.name: p for p in folder.iterdir() if (p / "metrics.json").exists()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    two = sweep(root / "two", "norm=sync,custom", "dist.nproc=2")
    one = sweep(root / "one", "norm=sync,ghost")
    vbs = yaml.safe_load((one["ghost"] / ".hydra" / "config.yaml").read_text())
    assert vbs["norm"]["virtual_batch_size"] == 32  # = 64 / 2 processes
    return {"sync2": two["sync"], "custom2": two["custom"], "sync1": one["sync"],
            "ghost1": one["ghost"]}


def assert_close_runs(a: Path, b: Path, rtol: float = 1e-4) -> None:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    cb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert ca.keys() == cb.keys()
    for key in ca:  # weights and running statistics
        torch.testing.assert_close(ca[key], cb[key], rtol=rtol, atol=rtol, msg=key)
    ha, hb = metrics(a)["history"], metrics(b)["history"]
    assert [sorted(h) for h in ha] == [sorted(h) for h in hb]
    for ea, eb in zip(ha, hb, strict=True):
        for key, value in ea.items():
            assert value == pytest.approx(eb[key], rel=rtol), key
    la, lb = scalars(a)["train/loss"], scalars(b)["train/loss"]
    assert [s for s, _ in la] == [s for s, _ in lb]
    assert [v for _, v in la] == pytest.approx([v for _, v in lb], rel=rtol)


@pytest.mark.slow
def test_sync_bn_on_two_processes_ends_as_one_process(runs: dict[str, Path]) -> None:
    assert metrics(runs["sync2"])["history"][-1]["test_acc_precise_bn"] is not None
    assert_close_runs(runs["sync2"], runs["sync1"])


@pytest.mark.slow
def test_per_device_bn_is_ghost_bn_at_the_per_rank_batch(runs: dict[str, Path]) -> None:
    assert_close_runs(runs["custom2"], runs["ghost1"])


@pytest.mark.slow
def test_only_rank_0_writes(runs: dict[str, Path]) -> None:
    run_dir = runs["sync2"]
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents.")]
    assert len(events) == 1  # one writer
    assert sorted(set(files) - set(events)) == [
        ".bnlab.lock", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
        "checkpoint.pt", "metrics.json", "train.log"]
    assert (run_dir / "train.log").read_text().count("epoch 3/3") == 1  # no other rank's lines
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_by_rank"]) == 2
    assert torch.equal(ckpt["rng"]["cpu"], ckpt["rng_by_rank"][0]["cpu"])
    tags = scalars(run_dir)
    assert [s for s, _ in tags["train/loss"]] == list(range(1, 22))  # each step once
    assert [s for s, _ in tags["act/p50/features.1"]] == [0, 5, 10, 15, 20]  # rank 0 probed


# -- interruption and resume ----------------------------------------------------------------------

# 30 steps per epoch, dropout on (every rank's RNG stream), the probes of the twin only.
RESUMED = (*ARGS, "batch_size=16", "norm=sync", "model.dropout=0.3",
           "eval.precise_bn_batches=2")


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted, probed run, through the SLURM launcher's local mode with 2 tasks."""
    folder = tmp_path_factory.mktemp("slurm") / "sweep"
    r = bnlab("train", "-m", *RESUMED, *PROBED, "hydra/launcher=local",
              "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={folder}",
              cwd=folder.parent, timeout=300)
    assert r.returncode == 0, r.stderr
    (job,) = [p for p in folder.iterdir() if (p / "metrics.json").exists()]
    return job


@pytest.mark.slow
def test_slurm_launcher_tasks_are_one_ddp_job(twin: Path) -> None:
    ckpt = torch.load(twin / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_by_rank"]) == 2 and metrics(twin)["status"] == "completed"
    assert len(list(twin.glob("events.out.tfevents.*"))) == 1
    assert (twin / "train.log").read_text().count("epoch 3/3") == 1


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_and_the_resumed_run_is_exact(
        tmp_path: Path, twin: Path) -> None:
    """Started by dist.nproc=2 without probes, stopped by a SIGTERM to the launcher and resumed
    under torchrun: bit-identical to the probed twin."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", "train", *RESUMED, "probe=off",
                             "dist.nproc=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and 30 <= m["steps"] < 90, m
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["step"] == m["steps"] and len(saved["rng_by_rank"]) == 2
    r = torchrun("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming {run_dir} at step {m['steps']}" in r.stdout
    assert_same_run(twin, run_dir)


# -- refusals -------------------------------------------------------------------------------------


def torchrun(*args: str, cwd: Path, logs: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m bnlab.cli *args``; with ``logs``, each
    rank's output goes to its own files there."""
    redirect = [f"--log-dir={logs}", "--redirects=3"] if logs else []
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *redirect, "-m", "bnlab.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_bad_input_is_refused_on_every_rank_in_one_line(tmp_path: Path) -> None:
    """Under torchrun each rank checks the config: a batch of 15 does not split over 2 ranks."""
    r = torchrun("train", *ARGS, "batch_size=15", f"hydra.run.dir={tmp_path / 'run'}",
                 cwd=tmp_path, logs=tmp_path / "logs")
    assert r.returncode != 0
    stderrs = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(stderrs) == 2
    for path in stderrs:
        assert path.read_text() == ("error: batch_size=15 is not divisible by the world size "
                                    "(2 processes): every process gets batch_size / world size "
                                    "samples; choose a multiple\n"), path
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_before_any_process_starts(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):  # another job holds it
        r = CliRunner().invoke(app, ["train", *ARGS, "batch_size=16", "dist.nproc=2",
                                     f"hydra.run.dir={run_dir}"])
    assert r.exit_code == 2, r.output
    assert r.stderr == (f"error: {run_dir} is in use by another bnlab process; wait for it to "
                        "finish or choose another run dir\n")
    assert not (run_dir / ".hydra").exists()
