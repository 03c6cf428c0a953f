"""`bnlab compare` on synthetic sweeps: numbers, stability summary, formats, files, errors."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from bnlab.analysis.compare import run_compare
from bnlab.analysis.events import Events, Series
from bnlab.analysis.plot import run_plot
from bnlab.analysis.runs import Run
from bnlab.analysis.summary import run_numbers
from bnlab.errors import UsageError
from tests.rundirs import write_hydra, write_run, write_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_ACC = {"custom": {0.01: 0.50, 0.1: 0.60, 1.0: 0.55},
            "none": {0.01: 0.45, 0.1: 0.52, 1.0: 0.70}}
SEEDS = (0, 1, 2)
UNFINISHED = {"broken-none", "broken-json", "running", "stale", "interrupted"}


def sweep_runs() -> list[dict]:
    """Two norms × three lrs × three seeds; at norm=none, lr=1 two seeds diverge (at lr 0.8
    and 0.7 of their schedules); the BN runs also have a Precise BN accuracy."""
    runs = []
    for norm, accs in BASE_ACC.items():
        for lr, acc in accs.items():
            for seed in SEEDS:
                final = acc + 0.01 * seed
                run = {"norm": norm, "lr": lr, "seed": seed, "final_test_acc": final,
                       "best_test_acc": final + 0.02, "final_train_acc": final + 0.05 * seed,
                       "hist_bins": 10}
                if norm == "custom":
                    run["final_test_acc_precise_bn"] = final + 0.03
                if norm == "none" and lr == 1.0 and seed < 2:
                    run |= {"status": "diverged", "diverged_step": 10 + seed,
                            "final_test_acc": None, "best_test_acc": None,
                            "lr_at_divergence": 0.8 - 0.1 * seed}
                runs.append(run)
    return runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict[Path, dict]]:
    root = tmp_path_factory.mktemp("sweeps") / "sweep"
    written = write_sweep(root, sweep_runs())
    write_hydra(root / "broken-none", {"seed": 9, "epochs": 2, "batch_size": 128,
                "data": "synthetic", "model": "cnn", "dropout": 0.0, "norm": "torch",
                "optimizer": "sgd", "lr": 0.1}, {"norm": "torch", "seed": 9})
    write_run(root / "broken-json", norm="torch", seed=8)
    (root / "broken-json" / "metrics.json").write_text("{not json")
    write_run(root / "running", norm="torch", status="running", seed=7)
    write_run(root / "stale", norm="torch", status="running", seed=6)
    hours_ago = 5 * 3600
    for file in (root / "stale").iterdir():
        os.utime(file, (file.stat().st_atime - hours_ago, file.stat().st_mtime - hours_ago))
    write_run(root / "interrupted", norm="torch", status="interrupted", seed=5)
    return root, written


@pytest.fixture(scope="module")
def sweep_doc(sweep, tmp_path_factory) -> dict:
    """The JSON comparison of the sweep, computed once for the tests that only read it."""
    out = tmp_path_factory.mktemp("doc") / "compare.json"
    run_compare([sweep[0]], fmt="json", out=out)
    return json.loads(out.read_text())


def compare_json(paths: list[Path], capsys, **kwargs) -> dict:
    run_compare(paths, fmt="json", figure=kwargs.pop("figure", None), **kwargs)
    return json.loads(capsys.readouterr().out)


def expected_by_setting(written: dict[Path, dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for info in written.values():
        config = info["metrics"]["config"]
        groups.setdefault((config["norm"], config["lr"]), []).append(info)
    return groups


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def test_rows_equal_the_runs_metrics(sweep, sweep_doc):
    written, doc = sweep[1], sweep_doc
    assert doc["varying"] == ["norm", "lr"]
    assert doc["fixed"]["dropout"] == 0.0 and "seed" not in doc["fixed"]
    expected = expected_by_setting(written)
    assert len(doc["settings"]) == len(expected) == 6
    for row in doc["settings"]:
        infos = expected[(row["setting"]["norm"], row["setting"]["lr"])]
        metrics = [info["metrics"] for info in infos]
        assert row["n_seeds"] == len(infos) and sorted(row["seeds"]) == list(SEEDS)
        gaps = [m["final_train_acc"] - m["final_test_acc"] for m in metrics
                if m["final_test_acc"] is not None]
        for key, values in {
            "final_test_acc": [m["final_test_acc"] for m in metrics],
            "best_test_acc": [m["best_test_acc"] for m in metrics],
            "gap": gaps,
            "peak_grad_norm": [info["peak_grad_norm"] for info in infos],
            "drift_w1": [info["drift_w1"] for info in infos],
            "ics_l2": [info["ics_l2"] for info in infos],
            "ics_cos": [info["ics_cos"] for info in infos],
            "final_test_acc_precise_bn": [m.get("final_test_acc_precise_bn") for m in metrics],
            "lr_at_divergence": [m.get("lr_at_divergence") for m in metrics],
            "white_offdiag": [info["white_offdiag"] for info in infos],
            "bnstats_mean_shift": [info["bnstats_mean_shift"] for info in infos],
        }.items():
            mean, std = mean_std(values)
            assert row["metrics"][key]["mean"] == pytest.approx(mean), key
            assert row["metrics"][key]["std"] == pytest.approx(std), key
        diverged = [m["diverged_step"] for m in metrics if m["diverged"]]
        assert row["n_diverged"] == len(diverged)
        assert sorted(row["diverged_steps"]) == sorted(diverged)


def test_lr_stability_summary(sweep_doc):
    stability = {s["group"]["norm"]: s for s in sweep_doc["lr_stability"]}
    assert stability["custom"]["lrs"] == [0.01, 0.1, 1.0]
    assert stability["custom"]["max_stable_lr"] == 1.0
    assert stability["custom"]["best_lr"] == 0.1
    assert stability["custom"]["best_final_test_acc"]["mean"] == pytest.approx(0.61)
    assert stability["none"]["max_stable_lr"] == 0.1
    # The one seed that survived lr=1 scores higher, but an lr where most seeds diverged
    # is no best lr.
    assert stability["none"]["best_lr"] == 0.1


def test_unfinished_and_broken_runs_are_listed_not_dropped(sweep_doc):
    doc = sweep_doc
    listed = {Path(run["run_dir"]).name: run for run in doc["unfinished"]}
    assert set(listed) == UNFINISHED
    assert listed["broken-none"]["status"] == "broken"
    assert "no metrics.json" in listed["broken-none"]["details"]
    assert listed["broken-json"]["status"] == "broken"
    assert "unreadable metrics.json" in listed["broken-json"]["details"]
    assert listed["running"]["status"] == "running"
    assert listed["stale"]["status"] == "stale"
    assert "no progress for 5 h" in listed["stale"]["details"]
    assert listed["interrupted"]["status"] == "interrupted"
    assert not any(seed in {5, 6, 7, 8, 9} for row in doc["settings"] for seed in row["seeds"])


def test_table_on_a_pipe_prints_every_row_whole(sweep, capsys):
    root, _ = sweep
    run_compare([root])
    captured = capsys.readouterr()
    out = captured.out
    assert "Results by setting" in out and "Learning-rate stability" in out
    assert "2/3 @ step 10, 11" in out
    assert "61.0 ± 1.0" in out  # custom, lr 0.1: 0.60, 0.61, 0.62
    for name in UNFINISHED:
        assert name in out
    assert "…" not in out  # nothing cut short at the default 80 columns of a pipe
    assert f"Wrote lr figure: {root / 'compare_lr.png'}" in captured.err
    assert (root / "compare_lr.png").read_bytes().startswith(PNG_MAGIC)


def test_csv_parses_with_one_row_per_setting_and_unfinished_run(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "results.csv"
    run_compare([root], fmt="csv", out=out)
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    finished = [row for row in rows if row["status"] == "finished"]
    assert len(finished) == 6 and len(rows) == 6 + len(UNFINISHED)
    custom = next(r for r in finished if r["norm"] == "custom" and float(r["lr"]) == 0.1)
    assert float(custom["final_test_acc_mean"]) == pytest.approx(0.61)
    assert float(custom["final_test_acc_std"]) == pytest.approx(0.01)
    assert custom["n_seeds"] == "3" and custom["n_diverged"] == "0"
    assert (tmp_path / "results_lr.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_markdown_and_plain_table_files(sweep, tmp_path):
    root, _ = sweep
    markdown = tmp_path / "results.md"
    run_compare([root], fmt="markdown", out=markdown, figure=tmp_path / "lr.svg")
    text = markdown.read_text()
    assert "| norm | lr | seeds | final test acc % |" in text
    assert "| none | 1.0 | 3 | 72.0 (n=1) |" in text
    assert ET.parse(tmp_path / "lr.svg").getroot().tag.endswith("svg")
    table = tmp_path / "results.txt"
    run_compare([root], fmt="table", out=table, figure=tmp_path / "lr.png")
    lines = table.read_text().splitlines()
    assert any("custom" in line and "61.0 ± 1.0" in line for line in lines)
    assert all(line == line.rstrip() for line in lines)


def test_precise_bn_divergence_whiteness_and_mismatch_columns(sweep, tmp_path, capsys):
    root, _ = sweep
    run_compare([root], fmt="markdown", figure=tmp_path / "lr.png")
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| norm | lr |"))
    assert header.startswith("| norm | lr | seeds | final test acc % | final test acc % "
                             "(precise BN) | best test acc % | train-test gap % | diverged | "
                             "lr at divergence |")
    assert header.endswith("| final off-diag corr (deepest) | final BN mean shift |")
    cells = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in lines
             if line.startswith(("| custom", "| none"))}
    columns = header.split(" | ")
    custom, none = cells[("| custom", "0.1")], cells[("| none", "1.0")]
    assert custom[columns.index("final test acc % (precise BN)")] == "64.0 ± 1.0"
    assert none[columns.index("final test acc % (precise BN)")] == "–"
    assert none[columns.index("lr at divergence")] == "0.75 ± 0.0707 (n=2)"
    assert custom[columns.index("lr at divergence")] == "–"
    # the deepest layer's last value, 0.1·3 + 40/1000 + seed/100, over seeds 0, 1, 2
    assert custom[columns.index("final off-diag corr (deepest)")] == "0.35 ± 0.01"


def test_columns_nobody_has_are_left_out_of_the_table(tmp_path, capsys):
    """Runs without the newer probes, Precise BN or divergence: no empty columns in the
    table; CSV and JSON keep a fixed set of fields, blank."""
    for seed in (0, 1):
        write_run(tmp_path / f"seed={seed}", seed=seed, probes=False)
    run_compare([tmp_path], fmt="markdown", figure=tmp_path / "lr.png")
    text = capsys.readouterr().out
    for header in ("precise BN", "lr at divergence", "off-diag corr", "BN mean shift"):
        assert header not in text
    assert "| final test acc % | best test acc % |" in text
    run_compare([tmp_path], fmt="csv", figure=tmp_path / "lr.png")
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["lr_at_divergence_mean"] == row["white_offdiag_mean"] == ""
    doc = compare_json([tmp_path], capsys, figure=tmp_path / "lr.png")
    assert doc["settings"][0]["metrics"]["final_test_acc_precise_bn"] == {
        "mean": None, "std": None, "n": 0}


def test_a_non_finite_last_probe_counts_as_missing():
    """A diverged run's last probe is NaN: no final whiteness; the mismatch averages the
    layers that have a number."""
    steps = np.array([0, 5])
    events = Events((), {
        "white/offdiag_corr/features.1": Series(steps, np.array([0.2, 0.3])),
        "white/offdiag_corr/classifier.1": Series(steps, np.array([0.4, math.nan])),
        "bnstats/mean_shift/features.1": Series(steps, np.array([9.0, 0.5])),
        "bnstats/mean_shift/classifier.1": Series(steps, np.array([0.1, math.inf])),
    }, {})
    numbers = run_numbers(Run(Path("run"), "diverged"), events)
    assert numbers["white_offdiag"] is None
    assert numbers["bnstats_mean_shift"] == 0.5
    assert numbers["final_test_acc_precise_bn"] is None and numbers["lr_at_divergence"] is None


def test_setting_outside_the_summary_config_gets_a_column(tmp_path, capsys):
    """Runs that differ only in an override the summary config lacks are not merged, and
    `optim.lr` beside `lr` adds no column."""
    for momentum in (0.1, 0.01):
        for seed in (0, 1):
            write_run(tmp_path / f"m={momentum},s={seed}", seed=seed, probes=False,
                      extra_overrides={"norm.momentum": momentum})
    doc = compare_json([tmp_path], capsys, figure=tmp_path / "lr.png")
    assert doc["varying"] == ["norm.momentum"]
    assert sorted(row["setting"]["norm.momentum"] for row in doc["settings"]) == [0.01, 0.1]


def test_corrupt_event_file_marks_the_run_broken(sweep, tmp_path, capsys):
    root, _ = sweep
    shutil.copytree(root / "norm=custom,optim.lr=0.1,seed=0", tmp_path / "bad")
    (events,) = (tmp_path / "bad").glob("events.out.tfevents.*")
    events.write_bytes(b"this is not a TensorBoard event file" * 10)
    doc = compare_json([tmp_path], capsys, figure=tmp_path / "lr.png")
    (run,) = doc["unfinished"]
    assert run["status"] == "broken" and "corrupt event file" in run["details"]
    assert events.name in run["details"]


@pytest.mark.parametrize(
    ("paths", "kwargs", "message"),
    [
        (["missing"], {}, "no such directory"),
        (["file.txt"], {}, "not a directory"),
        (["empty"], {}, "not a run or sweep dir"),
        ([], {"fmt": "excel"}, "unknown format 'excel'; use one of: table, csv"),
        ([], {"out": Path("nodir/out.csv"), "fmt": "csv"}, "does not exist"),
        ([], {"figure": Path("lr.jpg")}, "use a .png or .svg"),
        ([], {"out": Path("same.png"), "figure": Path("same.png")}, "same file"),
    ],
)
def test_user_mistakes_are_one_line_usage_errors(sweep, tmp_path, monkeypatch, paths, kwargs,
                                                 message):
    root, _ = sweep
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=message) as caught:
        run_compare([Path(p) for p in paths] or [root], **kwargs)
    assert "\n" not in str(caught.value)


def test_failed_compare_leaves_existing_files_alone(sweep, tmp_path):
    root, _ = sweep
    out = tmp_path / "results.csv"
    out.write_text("precious")
    (tmp_path / "a_dir.png").mkdir()
    with pytest.raises(UsageError, match="is a directory"):
        run_compare([root], fmt="csv", out=out, figure=tmp_path / "a_dir.png")
    with pytest.raises(UsageError, match="not a run or sweep dir"):
        run_compare([root, tmp_path], fmt="csv", out=out)
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir.png", "results.csv"]


@pytest.mark.slow
def test_end_to_end_a_tiny_real_sweep_compares_and_plots(tmp_path, capsys):
    """`bnlab train -m` on tiny synthetic data, then compare and plot its sweep dir."""
    sweep = tmp_path / "sweep"
    trained = subprocess.run(
        [sys.executable, "-m", "bnlab.cli", "train", "-m", "data=synthetic",
         "data.train_size=40", "data.test_size=40", "model.channels=[4,8]", "model.hidden=16",
         "batch_size=10", "eval_batch_size=40", "epochs=1", "threads=1", "norm=custom,none",
         "seed=0", "probe.act_every=1", "probe.hist_every=2", "probe.ics_every=2",
         "probe.batch_size=20", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    doc = compare_json([sweep], capsys)
    run_dirs = {json.loads((d / "metrics.json").read_text())["config"]["norm"]: d
                for d in sweep.iterdir() if d.is_dir()}
    assert doc["varying"] == ["norm"] and doc["unfinished"] == []
    for row in doc["settings"]:
        metrics = json.loads((run_dirs[row["setting"]["norm"]] / "metrics.json").read_text())
        assert row["metrics"]["final_test_acc"]["mean"] == metrics["final_test_acc"]
        assert row["n_diverged"] == int(metrics["diverged"])
        assert row["metrics"]["peak_grad_norm"]["mean"] is not None
    custom = next(row for row in doc["settings"] if row["setting"]["norm"] == "custom")
    assert custom["metrics"]["drift_w1"]["n"] == custom["metrics"]["ics_l2"]["n"] == 1
    assert (sweep / "compare_lr.png").read_bytes().startswith(PNG_MAGIC)
    run_plot([run_dirs["custom"], run_dirs["none"]], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG_MAGIC)


def test_the_lr_figure_marks_the_lr_at_divergence_of_range_tests(tmp_path):
    from bnlab.analysis.compare import _read_runs
    from bnlab.analysis.lr_figure import lr_figure
    from bnlab.analysis.runs import find_run_dirs
    from bnlab.analysis.summary import compare_runs

    runs = [{"norm": norm, "lr": 0.01, "seed": seed, "status": "diverged", "diverged_step": 40,
             "final_test_acc": None, "best_test_acc": None, "lr_at_divergence": lr * (1 + seed)}
            for norm, lr in (("custom", 2.0), ("none", 0.1)) for seed in SEEDS]
    write_sweep(tmp_path / "sweep", runs)
    fig = lr_figure(compare_runs(*_read_runs(find_run_dirs([tmp_path / "sweep"]))))
    (ax,) = fig.axes
    marked = sorted(round(float(line.get_xdata()[0]), 6) for line in ax.lines
                    if line.get_marker() == "v")
    assert marked == [round(0.1 * 2, 6), round(2.0 * 2, 6)]  # the means over seeds 0, 1, 2
    assert any(t.get_text() == "diverged at lr 4" for t in ax.texts)
