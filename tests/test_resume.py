"""Interruption and resume: a killed or signalled run, resumed, equals its uninterrupted twin."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab.rundir import epoch_checkpoint, kept_epochs
from tests.cli import bnlab, metrics, scalars, tiny

# 100 steps per epoch (long enough that a kill lands mid-epoch on a fast machine), 3 epochs,
# dropout on (global RNG) and augmentation on (stateless RNG).
STEPS = 100
ARGS = ("data=synthetic", "data.train_size=1000", "data.test_size=100", "epochs=3",
        "batch_size=10", "model.dropout=0.3", "optim.nesterov=true")


def start(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    args = tiny(root, *ARGS, f"hydra.run.dir={run_dir}", *extra)
    return subprocess.Popen([sys.executable, "-m", "bnlab.cli", "train", *args],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def assert_same_run(a: Path, b: Path) -> None:
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ma, mb = metrics(a), metrics(b)
    for key in ("status", "final_test_acc", "best_test_acc", "final_train_loss", "steps",
                "epochs_completed", "history", "config"):
        assert ma[key] == mb[key], key
    ta, tb = scalars(a), scalars(b)
    for tag in ("train/loss", "test/acc", "opt/lr"):
        assert ta[tag] == tb[tag], tag  # same steps, once each, same values


@pytest.fixture(scope="module")
def twin(tmp_path_factory, cifar_root) -> Path:
    run_dir = tmp_path_factory.mktemp("twin") / "run"
    r = bnlab("train", *tiny(cifar_root, *ARGS, f"hydra.run.dir={run_dir}"), cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    return run_dir


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(tmp_path, cifar_root, twin):
    """With keep_epoch_checkpoints on (the twin has it off): keeping them changes nothing of
    the run, and the resumed run goes on keeping them."""
    run_dir = tmp_path / "run"
    proc = start(cifar_root, run_dir, "keep_epoch_checkpoints=true")
    wait_for_checkpoint(run_dir, proc)
    time.sleep(0.2)  # into the next epoch
    proc.kill()
    proc.wait()
    assert metrics(run_dir)["status"] == "running"  # what a hard kill leaves behind
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["step"] == STEPS
    r = bnlab("train", "resume=" + str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout  # Hydra logs to stdout
    assert_same_run(twin, run_dir)
    assert kept_epochs(run_dir) == [0, 1, 2, 3]
    kept = [torch.load(run_dir / epoch_checkpoint(e), weights_only=True) for e in (1, 3)]
    assert [c["progress"]["step"] for c in kept] == [STEPS, 3 * STEPS]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, kept[1]["model"][k]) for k, v in final.items())


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_saves_and_resumes_exactly(tmp_path, cifar_root, twin, signum, code):
    run_dir = tmp_path / "run"
    proc = start(cifar_root, run_dir)
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    m = metrics(run_dir)
    assert m["status"] == "interrupted" and STEPS <= m["steps"] < 3 * STEPS
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["step"] == m["steps"]
    r = bnlab("train", *tiny(cifar_root, *ARGS, f"hydra.run.dir={run_dir}", "resume=true"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_same_run(twin, run_dir)


def unfinished_copy(twin: Path, tmp_path: Path) -> Path:
    """The twin's run dir, marked unfinished, so resuming it must read its checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(twin, run_dir)
    (run_dir / "metrics.json").write_text('{"status": "running"}')
    return run_dir


@pytest.mark.slow
def test_resume_refuses_a_corrupt_checkpoint(tmp_path, twin):
    run_dir = unfinished_copy(twin, tmp_path)
    (run_dir / "checkpoint.pt").write_bytes(b"garbage")
    r = bnlab("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot resume from"), r.stderr


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, twin):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    run_dir = unfinished_copy(twin, tmp_path)
    torch.save({"model": Evil()}, run_dir / "checkpoint.pt")
    r = bnlab("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 2 and "cannot resume" in r.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_rerun_sweep_with_resume_skips_finished_and_resumes_unfinished(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny(cifar_root, *ARGS, "seed=0,1", f"hydra.sweep.dir={sweep}")]
    proc = subprocess.Popen([sys.executable, "-m", "bnlab.cli", "train", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    deadline = time.monotonic() + 120
    while second is None:  # the second job has checkpointed its first epoch: kill the sweep
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        second = next((d for d in sweep.glob("*seed=1*") if (d / "checkpoint.pt").exists()), None)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = next(sweep.glob("*seed=0*"))
    assert metrics(first)["status"] == "completed" and metrics(second)["status"] == "running"
    finished = (first / "metrics.json").read_bytes()
    r = bnlab("train", *args, "resume=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stdout and "resuming" in r.stdout
    assert (first / "metrics.json").read_bytes() == finished
    assert metrics(second)["status"] == "completed" and metrics(second)["epochs_completed"] == 3


def mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_a_run_started_with_overwrite_resumes_without_losing_progress(tmp_path, cifar_root,
                                                                       twin):
    """A finished run, overwritten by a longer one that is interrupted, then `resume=DIR`: the
    saved overrides carry overwrite=true, and resuming must continue from the checkpoint (ending
    as the uninterrupted twin), not delete it and start again."""
    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, "data=synthetic", "epochs=1", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    old = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    proc = start(cifar_root, run_dir, "overwrite=true")
    deadline = time.monotonic() + 90
    while mtime(run_dir / "checkpoint.pt") in (None, old):  # wait for the new run's first epoch
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    stopped_at = metrics(run_dir)["steps"]
    assert metrics(run_dir)["status"] == "interrupted" and stopped_at >= STEPS
    r = bnlab("train", f"resume={run_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"resuming {run_dir} at step {stopped_at}" in r.stdout, r.stdout
    assert_same_run(twin, run_dir)


@pytest.mark.slow
def test_resume_and_overwrite_together_is_an_error(tmp_path, twin):
    run_dir = unfinished_copy(twin, tmp_path)
    before = (run_dir / "checkpoint.pt").read_bytes()
    r = bnlab("train", f"resume={run_dir}", "overwrite=true", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("error: resume=true and overwrite=true contradict each other: resume "
                        "continues the run in its dir, overwrite deletes it; pass one\n")
    assert (run_dir / "checkpoint.pt").read_bytes() == before
