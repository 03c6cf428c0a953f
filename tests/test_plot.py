"""`bnlab plot` and event reading on synthetic run dirs."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from bnlab.analysis.events import read_events
from bnlab.analysis.plot import choose_layers, run_plot
from bnlab.analysis.runs import load_run
from bnlab.analysis.training_figure import RunData, plan_rows
from bnlab.errors import UsageError
from tests.rundirs import LAYERS, NORMS, write_events, write_run, write_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A BN run, a diverged run without BN, and a run with its probes off."""
    root = tmp_path_factory.mktemp("runs")
    made = {"custom": root / "custom", "none": root / "none", "bare": root / "bare"}
    write_run(made["custom"], norm="custom", lr=0.1)
    write_run(made["none"], norm="none", lr=1.0, status="diverged", diverged_step=20,
              final_test_acc=None, best_test_acc=None)
    write_run(made["bare"], probes=False)
    return made


@pytest.mark.slow
def test_png_figure_of_runs_side_by_side(runs, tmp_path, capsys):
    out = tmp_path / "fig.png"
    run_plot([runs["custom"], runs["none"]], out, layers=["features.0"])
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert f"Wrote figure: {out}" in capsys.readouterr().err


def test_svg_figure_with_chosen_layer_and_steps(runs, tmp_path):
    out = tmp_path / "fig.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to be searched
        run_plot([runs["custom"]], out, layers=["features.1"], steps=[0, 12, 40])
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = "".join(root.itertext())
    assert "features.1" in text and "step 10" in text  # 12 snaps to the nearest logged, 10


def test_whiteness_and_statistics_mismatch_panels(runs, tmp_path):
    data = [RunData(load_run(runs[n]), read_events(runs[n], histograms=False))
            for n in ("custom", "bare")]
    lines = [row.key for row in plan_rows(data, ["features.0"]) if row.kind == "lines"]
    assert lines == ["drift/w1/", "ics/l2/", "ics/cos/", "white/offdiag_corr/",
                     "white/erank_frac/", "white/cond/", "bnstats/mean_shift/",
                     "bnstats/log_var_ratio/"]  # no whitening_dist: no decorrelated BN
    assert not [row for row in plan_rows(data[1:], []) if row.key.startswith(("white",
                                                                              "bnstats"))]
    out = tmp_path / "fig.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        run_plot([runs["custom"], runs["none"]], out, layers=["features.1"])
    text = "".join(ET.parse(out).getroot().itertext())
    assert "|off-diag correlation|" in text and "number (log)" in text
    assert "mean shift (running stds)" in text and "|log variance ratio|" in text
    # the mismatch row shows the norm layers (features.1 chosen; classifier.1 not)
    assert "classifier.1" not in text


def test_run_without_probes_still_plots_its_gradients(runs, tmp_path):
    out = tmp_path / "bare.png"
    run_plot([runs["bare"]], out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_list_prints_what_was_logged_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_plot([runs["custom"], runs["bare"]], None, list_only=True)
    out = capsys.readouterr().out
    assert "steps 0–40" in out
    assert ", ".join(LAYERS) in out  # the watched layers, in model order
    assert "act/hist/features.0" in out and "0, 10, 20, 30, 40" in out
    assert "white" in out and "bnstats" in out and ", ".join(NORMS) in out
    assert "norm=custom" in out and "status: completed" in out
    assert list(tmp_path.iterdir()) == []


def test_default_layers_are_shallow_middle_deep_and_common_to_all_runs(runs):
    data = [RunData(load_run(runs[n]), read_events(runs[n], histograms=False))
            for n in ("custom", "none")]
    assert choose_layers(data, None) == ["features.0", "features.4", "classifier.1"]
    assert choose_layers(data, ["features.1", "features.1"]) == ["features.1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": ["features.9"]}, "unknown layer 'features.9' in .*; watched layers: "
                                     "features.0, features.1"),
        ({"steps": [999]}, "step 999 is outside the histogram steps 0–40"),
        ({"out": "fig.pdf"}, "unsupported figure type '.pdf'; use a .png or .svg"),
        ({"out": None}, "--out FILE.png or FILE.svg is required"),
        ({"out": "nodir/fig.png"}, "directory nodir does not exist"),
    ],
)
def test_user_mistakes_are_one_line_usage_errors(runs, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.chdir(tmp_path)
    out = kwargs.pop("out", "fig.png")
    with pytest.raises(UsageError, match=message) as caught:
        run_plot([runs["custom"]], Path(out) if out else None, **kwargs)
    assert "\n" not in str(caught.value)


def test_bad_run_dirs(runs, tmp_path):
    write_sweep(tmp_path / "sweep", [{"probes": False}])
    (tmp_path / "plain").mkdir()
    cases = {tmp_path / "missing": "no such directory", tmp_path / "plain": "not a run dir",
             tmp_path / "sweep": "is a sweep dir, not a run dir; plot its runs, e.g. "}
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            run_plot([runs["custom"], path], tmp_path / "fig.png")
    with pytest.raises(UsageError, match="share no watched layer"):
        run_plot([runs["custom"], runs["bare"]], tmp_path / "fig.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "sweep"]


def test_corrupt_event_file_is_a_usage_error_and_clobbers_nothing(tmp_path):
    run = tmp_path / "run"
    write_run(run, probes=False)
    (events,) = run.glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[:40] + b"garbage" * 20 + data[40:])
    out = tmp_path / "fig.png"
    out.write_bytes(b"old figure")
    with pytest.raises(UsageError, match=f"corrupt event file {events}"):
        run_plot([run], out)
    assert out.read_bytes() == b"old figure"


def test_event_file_cut_short_by_a_live_writer_reads_up_to_the_cut(tmp_path):
    write_events(tmp_path, {"train/loss": [(s, 1.0) for s in range(10)]})
    (events,) = tmp_path.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-5])
    assert list(read_events(tmp_path).scalars["train/loss"].steps) == list(range(9))


def test_resumed_run_later_event_file_wins(tmp_path):
    """A writer resumed at step 30 replaces what the first one logged from step 30 on."""
    write_events(tmp_path, {"train/loss": [(s, 1.0) for s in range(0, 55, 5)]},
                 {"act/hist/features.0": [(s, np.full(10, 1.0)) for s in (0, 40)]},
                 stamp=1_700_000_000)
    write_events(tmp_path, {"train/loss": [(s, 2.0) for s in range(40, 65, 5)]},
                 {"act/hist/features.0": [(s, np.full(10, 2.0)) for s in (40,)]},
                 stamp=1_700_000_100, purge_step=30)
    events = read_events(tmp_path)
    loss = events.scalars["train/loss"]
    assert list(loss.steps) == [0, 5, 10, 15, 20, 25, 40, 45, 50, 55, 60]
    assert list(loss.values) == [1.0] * 6 + [2.0] * 5
    snaps = events.histograms["act/hist/features.0"]
    assert [(s.step, s.edges.max()) for s in snaps] == [(0, 1.0), (40, 2.0)]
    assert len(events.files) == 2 and events.steps() == (0, 60)
