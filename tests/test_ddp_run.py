"""``bnlab train`` under DDP: 2 CPU processes (gloo) through torch's elastic launcher, started
by ``dist.nproc=2`` (and torchrun itself, and submitit's local mode of the SLURM launcher).

- ``norm=sync`` on 2 processes ends as the 1-process run within float tolerance (Precise BN
  pooled over ranks included);
- ``norm=custom`` on 2 processes (per-device BN) ends as ``norm=ghost`` with
  ``virtual_batch_size`` = the per-rank batch, running statistics included;
- only rank 0 writes; the SLURM launcher's tasks are one DDP job; a SIGTERM stops both ranks
  at one step with one checkpoint, and the resumed run ends bit-identical to the uninterrupted
  one (with dropout: every rank's RNG stream is restored), which was probed (probes on rank 0
  are read-only);
- bad input is refused on every rank in one line, a run dir in use before any process starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli import bnlab, metrics, scalars
from tests.test_resume import assert_same_run, wait_for_checkpoint

# 30 steps per epoch of a global batch of 16 (8 per rank), 3 epochs; augmentation on (per-rank
# shards of the one-process batches).
ARGS = ("data=synthetic", "data.train_size=480", "data.test_size=64", "batch_size=16",
        "epochs=3", "model.channels=[4,8]", "model.hidden=16", "threads=1")
TWIN = ("norm=sync", "model.dropout=0.3")
PROBED = ("probe.act_every=10", "probe.grad_every=10", "probe.ics_every=30",
          "probe.bnstats_every=15", "eval.precise_bn_batches=2")


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    r = bnlab("train", *ARGS, f"hydra.run.dir={run_dir}", *extra, cwd=run_dir.parent,
              timeout=240)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """norm=sync, probed and with Precise BN: on 2 processes, and on 1."""
    root = tmp_path_factory.mktemp("sync")
    two = train(root / "two", "norm=sync", "dist.nproc=2", "model.dropout=0", *PROBED)
    train(root / "one", "norm=sync", "model.dropout=0", *PROBED)
    return {"two": root / "two", "one": root / "one", "stdout": two.stdout}


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
def test_sync_bn_on_two_processes_ends_as_one_process(sync_runs: dict) -> None:
    two, one = sync_runs["two"], sync_runs["one"]
    assert metrics(two)["history"][-1]["test_acc_precise_bn"] is not None
    assert_close_runs(two, one)


@pytest.mark.slow
def test_only_rank_0_writes(sync_runs: dict) -> None:
    run_dir = sync_runs["two"]
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("events.out.tfevents.")]
    assert len(events) == 1  # one writer
    assert sorted(set(files) - set(events)) == [
        ".bnlab.lock", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
        "checkpoint.pt", "metrics.json", "train.log"]
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 3/3") == 1  # no other rank's lines
    assert sync_runs["stdout"].count("completed: ") == 1  # one summary
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng_by_rank"]) == 2 and torch.equal(ckpt["rng"]["cpu"],
                                                         ckpt["rng_by_rank"][0]["cpu"])
    steps = [s for s, _ in scalars(run_dir)["train/loss"]]
    assert steps == list(range(1, 91))  # each step once


@pytest.mark.slow
def test_per_device_bn_is_ghost_bn_at_the_per_rank_batch(tmp_path: Path) -> None:
    train(tmp_path / "custom", "norm=custom", "dist.nproc=2", "probe=off", "model.dropout=0")
    train(tmp_path / "ghost", "norm=ghost", "norm.virtual_batch_size=8", "probe=off",
          "model.dropout=0")
    assert_close_runs(tmp_path / "custom", tmp_path / "ghost")


@pytest.mark.slow
def test_bad_input_is_refused_on_every_rank_in_one_line(tmp_path: Path) -> None:
    """Under torchrun each rank checks the config: batch 15 does not split over 2 ranks."""
    logs = tmp_path / "logs"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", f"--log-dir={logs}", "--redirects=3", "-m",
                        "bnlab.cli", "train", *ARGS, "batch_size=15",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    stderrs = sorted(logs.rglob("stderr.log"))
    assert len(stderrs) == 2
    for path in stderrs:
        assert path.read_text() == ("error: batch_size=15 is not divisible by the world size "
                                    "(2 processes): every process gets batch_size / world size "
                                    "samples; choose a multiple\n"), path
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    from bnlab.rundir import run_dir_lock

    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        t0 = time.monotonic()
        r = bnlab("train", *ARGS, "dist.nproc=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == (f"error: {run_dir} is in use by another bnlab process; wait for it to "
                        "finish or choose another run dir\n")
    assert time.monotonic() - t0 < 60 and not (run_dir / ".hydra").exists()


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probed run with dropout (per-rank RNG streams), through the SLURM launcher's local mode
    with 2 tasks: one DDP job."""
    sweep = tmp_path_factory.mktemp("slurm") / "sweep"
    r = bnlab("train", "-m", *ARGS, *TWIN, *PROBED, "hydra/launcher=local",
              "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", cwd=sweep.parent,
              timeout=240)
    assert r.returncode == 0, r.stderr
    (job,) = [p for p in sweep.iterdir() if (p / "metrics.json").exists()]
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
    """Started by dist.nproc=2, interrupted and resumed without probes, the run ends
    bit-identical to the probed twin of the SLURM launcher."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [*ARGS, *TWIN, "dist.nproc=2", "probe=off", "eval.precise_bn_batches=2",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", "train", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(run_dir, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and 30 <= m["steps"] < 90, m
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["step"] == m["steps"] and len(saved["rng_by_rank"]) == 2
    r = bnlab("train", f"resume={run_dir}", cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"resuming {run_dir} at step {m['steps']}" in r.stdout
    assert_same_run(twin, run_dir)
