from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from typer.testing import CliRunner

from bnlab import rundir, train
from bnlab.cli import app
from bnlab.errors import UsageError
from bnlab.rundir import run_dir_lock
from tests.cli import bnlab, digest, metrics, scalars, tiny

METRIC_KEYS = {"status", "final_test_acc", "best_test_acc", "final_train_loss", "final_train_acc",
               "diverged", "diverged_step", "epochs_completed", "steps", "wall_time_s",
               "images_per_s", "peak_rss_mb", "config", "history"}


@pytest.mark.parametrize("norm", ["custom", pytest.param("torch", marks=pytest.mark.slow),
                                  pytest.param("none", marks=pytest.mark.slow)])
def test_single_run_writes_a_self_contained_run_dir(tmp_path, cifar_root, norm):
    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, f"norm={norm}", "probe=off", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = metrics(run_dir)
    assert m.keys() >= METRIC_KEYS
    assert m["status"] == "completed" and m["diverged"] is False and m["diverged_step"] is None
    assert m["epochs_completed"] == 2 and m["steps"] == 2 * (100 // 10)
    assert 0 <= m["final_test_acc"] <= 1 and m["best_test_acc"] >= m["final_test_acc"]
    assert m["config"] == {"norm": norm, "model": "cnn", "lr": 0.01, "dropout": 0.0,
                           "batch_size": 10, "seed": 0, "epochs": 2, "optimizer": "sgd",
                           "momentum": 0.9, "weight_decay": 0.0005, "sched": "cosine",
                           "data": "cifar10", "norm_slots": "all", "norm_rest": None}
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert m["history"][-1]["test_acc"] == m["final_test_acc"]
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert cfg["norm"]["name"] == norm
    assert f"norm={norm}" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    tags = scalars(run_dir)
    assert [s for s, _ in tags["train/loss"]] == list(range(1, 21))
    assert [s for s, _ in tags["test/acc"]] == [10, 20]
    assert tags["test/acc"][-1][1] == pytest.approx(m["final_test_acc"])
    assert {"train/acc", "test/loss", "opt/lr", "hparam/final_test_acc"} <= tags.keys()
    assert (run_dir / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_sweep_names_job_dirs_from_overrides_and_survives_divergence(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "probe=off", "norm=torch,none",
                                   "optim.lr=0.05,1e5", f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    common = "batch_size=10,epochs=2,eval_batch_size=64,model.channels=[4,8],model.hidden=16,"
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert names == sorted(f"{common}norm={n},optim.lr={lr},probe=off"
                           for n in ("none", "torch") for lr in ("0.05", "100000.0"))
    runs = {n: metrics(sweep / n) for n in names}
    assert all(m["status"] in ("completed", "diverged") for m in runs.values())
    diverged = [m for m in runs.values() if m["diverged"]]
    assert diverged and all(m["config"]["lr"] == 1e5 for m in diverged)
    for m in diverged:
        assert m["status"] == "diverged" and m["diverged_step"] >= 1
        assert m["final_test_acc"] is None


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "parallel"])
def test_a_bad_value_in_any_sweep_job_fails_before_the_first_job_starts(tmp_path, cifar_root,
                                                                       launcher):
    # The bad value is in the second of 14 jobs (the preset's sweep params come first): no job
    # may run, not even the first.
    sweep = tmp_path / "sweep"
    r = bnlab("train", *tiny(cifar_root, "experiment=lr_stability", "norm=torch", "seed=0",
                             "model.dropout=0,1.5", f"hydra/launcher={launcher}",
                             f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == ("error: sweep job optim.lr=0.003 model.dropout=1.5: model.dropout=1.5 "
                        "is invalid: input should be less than 1; allowed: dropout rate, in "
                        "[0, 1); no job was started")
    assert not sweep.exists()


@pytest.mark.parametrize("extra", [
    ["seed=${hydra:job.num}"],  # resolved per job, as the launcher will
    # On a cluster the jobs' device and data are the nodes', not this machine's.
    ["hydra/launcher=slurm", "device=cuda:7", "data.root=/only/on/the/nodes"],
], ids=["hydra-interpolation", "slurm"])
@pytest.mark.slow
def test_the_sweep_check_sees_each_job_as_it_will_run(tmp_path, cifar_root, extra):
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, *extra, "model.dropout=0,1.5",
                                   f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: sweep job model.dropout=1.5: model.dropout=1.5 is invalid: input should be less "
        "than 1; allowed: dropout rate, in [0, 1); no job was started"]
    assert not sweep.exists()


def test_help_explains_hydra_hand_off_with_examples(tmp_path):
    r = bnlab("--help", cwd=tmp_path)
    assert r.returncode == 0 and "train" in r.stdout and "compare" in r.stdout
    r = bnlab("train", "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "bnlab train -m norm=custom,torch,none" in r.stdout and "--cfg job" in r.stdout


def test_hydra_flags_pass_through(tmp_path):
    r = bnlab("train", "--cfg", "job", "norm=none", "optim=adam", "+extra=1", "~sched",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["norm"]["name"] == "none" and cfg["optim"]["name"] == "adam"
    assert cfg["extra"] == 1 and "sched" not in cfg
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cifar_root) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = bnlab("train", *tiny(cifar_root, "epochs=1", "probe=off", f"hydra.run.dir={run_dir}"),
              cwd=run_dir.parent)
    assert r.returncode == 0, r.stderr
    return run_dir


BAD_INPUTS = [
    (["norm=batch"], r"Could not find 'norm/batch'.*Available options in 'norm':.*custom"),
    (["optim.lrr=0.1"], r"Could not override 'optim.lrr'"),
    (["optim.lr=abc"], r"optim.lr='abc' is invalid: input should be a valid number; .*> 0"),
    (["optim.lr=0"], r"optim.lr=0 is invalid: input should be greater than 0"),
    (["model.dropout=1.0"], r"model.dropout=1.0 is invalid: input should be less than 1"),
    (["model.dropout=-0.1"], r"model.dropout=-0.1 is invalid"),
    (["batch_size=0"], r"batch_size=0 is invalid: input should be greater than or equal to 2"),
    (["epochs=0"], r"epochs=0 is invalid: input should be greater than or equal to 1"),
    (["epochs=2.5"], r"epochs=2.5 is invalid: input should be a valid integer"),
    (["device=tpu"], r"device='tpu' is invalid: .*allowed: auto, cpu, cuda, cuda:N or mps"),
    (["device=cuda:3"], r"device=cuda:3 is not available"),
    (["data.root=/no/such/dir"], r"CIFAR-10 not found: looked for /no/such/dir"),
    (["optim.lr=["], r"no viable alternative at input"),
    (["resume=/no/such/run"], r"resume=/no/such/run: not a run dir"),
    (["probe.act_every=-5"], r"probe.act_every=-5 is invalid: input should be greater than or eq"),
    (["channels_last=nhwc"], r"channels_last='nhwc' is invalid: .*'auto' or .* a valid boolean"),
    (["probe.act_seed=random"], r"probe.act_seed='random' is invalid: input should be 'fixed' or"),
    (["optim=adam", "optim.beta2=1.5"], r"optim.beta2=1.5 is invalid: input should be less than 1"),
    (["optim.lr=inf"], r"optim.lr=inf is invalid: input should be a finite number"),
    (["sched=step", "sched.milestones=[2]"], r"sched.milestones=\[2\] is invalid \(item 0\)"),
    (["resume=true", "overwrite=true"], r"resume=true and overwrite=true contradict"),
    (["norm=group", "norm.num_groups=3"], r"norm.num_groups=3 does not divide a norm slot of 4"),
    (["norm=evonorm_s0", "norm.groups=3"], r"norm.groups=3 does not divide a norm slot of 4"),
    # refused before any process is launched
    (["dist.nproc=0"], r"dist.nproc=0 is invalid: input should be greater than or equal to 1"),
    (["dist.nproc=3"], r"batch_size=10 is not divisible by dist.nproc=3: every process gets"),
    (["dist.nproc=11"], r"dist.nproc=11 is larger than batch_size=10: every process needs"),
    (["dist.nproc=10"], r"batch_size=10 over 10 processes gives each 1 sample, and "
                        r"norm=custom normalizes each process's batch on its own"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=lambda a: str(a))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(cifar_root, finished_run, monkeypatch,
                                                          args, message):
    # In-process (the same code path as the console script, minus interpreter start-up).
    monkeypatch.chdir(finished_run.parent)
    before = digest(finished_run.parent)
    r = CliRunner().invoke(app, ["train", *tiny(cifar_root, "probe=off"), *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in r.stderr
    assert digest(finished_run.parent) == before


def test_a_run_dir_in_use_by_another_process_is_refused_untouched(cifar_root, finished_run,
                                                                  monkeypatch):
    """A second process on a run dir (a sweep re-launched while the first runs) is refused in
    one line before Hydra rewrites .hydra/, and the lock goes with its holder."""
    monkeypatch.chdir(finished_run.parent)
    before = digest(finished_run)
    args = ["train", *tiny(cifar_root, "probe=off", "overwrite=true",
                           f"hydra.run.dir={finished_run}")]
    with run_dir_lock(finished_run):  # another process holds the dir
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, r.output
        assert r.stderr == f"error: {finished_run} is in use by another bnlab process; wait " \
                           "for it to finish or choose another run dir\n"
        assert digest(finished_run) == before
        with pytest.raises(UsageError, match="in use by another bnlab process"):
            train.run(OmegaConf.load(finished_run / ".hydra" / "config.yaml"), finished_run)
        assert digest(finished_run) == before
    with run_dir_lock(finished_run):  # released with its holder
        pass


def test_a_filesystem_without_locks_runs_unguarded(tmp_path, monkeypatch, caplog):
    def no_locks(fd: object, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with run_dir_lock(tmp_path / "run"):
        pass
    assert "not guarded against a second process" in caplog.text


@pytest.mark.slow
def test_bad_input_from_the_console_has_no_traceback(tmp_path, cifar_root):
    r = bnlab("train", *tiny(cifar_root, "probe=off", "optim.lr=-1"), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == ("error: optim.lr=-1 is invalid: input should be greater than 0; "
                        "allowed: learning rate (a finite number > 0)\n")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_refusal_does_not_import_the_compiler(tmp_path):
    """Refusing bad input takes the time of the imports it needs: not torch._dynamo's, which
    torch.compiler.disable at import time (once: SyncBN's) made every bnlab process pay."""
    script = ("import sys\nfrom bnlab.cli import main\n"
              "sys.argv = ['bnlab', 'train', 'data=synthetic', 'norm=custom', 'optim.lr=-1']\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
              "print('torch._dynamo' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.slow
def test_a_finished_run_dir_is_not_overwritten_unless_asked(tmp_path, cifar_root, finished_run):
    before = digest(finished_run)
    r = bnlab("train", *tiny(cifar_root, "probe=off", "norm=none",
                             f"hydra.run.dir={finished_run}"), cwd=tmp_path)
    assert r.returncode == 2
    assert "already holds a finished run" in r.stderr and "overwrite=true" in r.stderr
    assert digest(finished_run) == before
    # resume=true on a finished run skips it, keeping its results
    results = metrics(finished_run)
    r = bnlab("train", *tiny(cifar_root, "epochs=1", "probe=off", "resume=true",
                             f"hydra.run.dir={finished_run}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already finished" in r.stderr + r.stdout
    assert metrics(finished_run) == results


@pytest.mark.slow
def test_overwrite_starts_over_cleanly(tmp_path, cifar_root, finished_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    r = bnlab("train", *tiny(cifar_root, "probe=off", "norm=none", "overwrite=true",
                             f"hydra.run.dir={run_dir}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert metrics(run_dir)["config"]["norm"] == "none"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_unwritable_output_dir_is_a_clear_error(tmp_path, cifar_root):
    if os.geteuid() == 0:
        target = Path("/proc/bnlab-run")  # not even root can create a dir here
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    r = bnlab("train", *tiny(cifar_root, "probe=off", f"hydra.run.dir={target}"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and str(target) in lines[0]


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path, cifar_root):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    r = bnlab("train", *tiny(cifar_root, "probe=off", "optim.lr=-1"), cwd=tmp_path, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "optim.lr=-1" in r.stderr


def test_the_run_dir_lock_is_held_from_the_check_through_the_run(tmp_path, cifar_root,
                                                                monkeypatch):
    """The check that the dir is free and the run itself hold one lock, taken before Hydra writes
    .hydra/: a second launch cannot slip in between and rewrite it."""
    import hydra.core.utils

    run_dir = tmp_path / "run"
    held_when: dict[str, bool] = {}

    def is_locked() -> bool:
        with open(run_dir / rundir.LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    save_config, real_run = hydra.core.utils._save_config, train.run

    def saving(cfg, filename, output_dir):
        held_when[f"writing {filename}"] = is_locked()
        return save_config(cfg, filename, output_dir)

    def running(*args, **kwargs):
        held_when["training"] = is_locked()
        return real_run(*args, **kwargs)

    monkeypatch.setattr(hydra.core.utils, "_save_config", saving)
    monkeypatch.setattr(train, "run", running)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", *tiny(cifar_root, "probe=off", "epochs=1"),
                                 f"hydra.run.dir={run_dir}"])
    assert r.exit_code == 0, r.output
    assert held_when == {"writing config.yaml": True, "writing hydra.yaml": True,
                         "writing overrides.yaml": True, "training": True}
    assert not is_locked()  # released at the end


@pytest.mark.slow
def test_a_run_ends_with_a_summary_of_where_it_went(tmp_path, cifar_root):
    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, "probe=full", "epochs=1", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = metrics(run_dir)
    out = r.stdout.splitlines()
    assert f"completed: test acc {m['final_test_acc']:.4f} (best {m['best_test_acc']:.4f}), " \
           f"{m['wall_time_s']:.1f} s, run dir {run_dir}" in out
    assert any(f"tensorboard --logdir {run_dir}" in line and f"bnlab plot {run_dir}" in line
               for line in out)
    # probe=full measures ICS every 100 steps; this run has 10: said once, at the start.
    assert r.stdout.count("probe.ics_every=100 is longer than this run (10 steps)") == 1


@pytest.mark.slow
def test_a_sweep_ends_with_the_compare_command(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    r = bnlab("train", "-m", *tiny(cifar_root, "probe=off", "epochs=1", "seed=0,1",
                                   f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"compare: bnlab compare {sweep}" in r.stdout


@pytest.mark.slow
def test_hparams_columns_start_with_what_users_compare(tmp_path, cifar_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "run"
    r = bnlab("train", *tiny(cifar_root, "probe=off", "epochs=1", f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    names = [h.name for h in experiment.hparam_infos]
    assert names[:4] == ["norm", "lr", "dropout", "batch_size"]
    assert [m.name.tag for m in experiment.metric_infos] == [
        "hparam/final_test_acc", "hparam/best_test_acc", "hparam/diverged"]


@pytest.mark.slow
def test_a_sweep_whose_job_dir_names_are_too_long_fails_before_any_job(tmp_path, cifar_root):
    sweep = tmp_path / "sweep"
    long = ["data.augment.crop=true", *(f"probe.{k}_every=0" for k in
                                         ("act", "hist", "white", "grad", "bnstats", "ics",
                                          "landscape")), "eval.precise_bn_batches=0",
            "norm.momentum=0.01", "optim.weight_decay=0.0005", "optim.nesterov=false",
            "model.hidden=16", "model.conv_dropout=0.0", "data.augment.flip=true"]
    r = bnlab("train", "-m", *tiny(cifar_root, "norm=custom,torch", *long,
                                   f"hydra.sweep.dir={sweep}"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "bytes, over the file system's 255" in line and "no job was started" in line
    assert not sweep.exists()
