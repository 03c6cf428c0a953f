from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bnlab.rundir import write_json
from bnlab.tracking import Tracker


def read(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_from_tensors_and_floats_are_written_per_step(tmp_path):
    t = Tracker(tmp_path)
    t.scalars({"grad/global_norm": torch.tensor(1.5), "opt/lr": 0.1}, 1)
    t.scalars({"grad/global_norm": torch.tensor(float("nan"))}, 2)
    t.close()
    acc = read(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("opt/lr")] == [(1, pytest.approx(0.1))]
    values = [(e.step, e.value) for e in acc.Scalars("grad/global_norm")]
    assert values[0] == (1, 1.5) and values[1][0] == 2 and math.isnan(values[1][1])


def test_histograms_drop_non_finite_values_and_skip_empty(tmp_path):
    t = Tracker(tmp_path)
    t.histograms({"act/hist/a": torch.tensor([1.0, float("inf"), 3.0]),
                  "act/hist/b": torch.tensor([float("nan")])}, 5)
    t.close()
    acc = read(tmp_path)
    assert acc.Tags()["histograms"] == ["act/hist/a"]
    assert acc.Histograms("act/hist/a")[0].histogram_value.num == 2


def test_resume_purges_the_steps_it_redoes(tmp_path):
    first = Tracker(tmp_path)
    first.scalars({"train/loss": 1.0}, 1)
    first.scalars({"train/loss": 2.0}, 2)
    first.scalars({"train/loss": 3.0}, 3)  # written after the checkpoint at step 2, then killed
    first.close()
    resumed = Tracker(tmp_path, purge_step=3)
    resumed.scalars({"train/loss": 30.0}, 3)
    resumed.close()
    steps = [(e.step, e.value) for e in read(tmp_path).Scalars("train/loss")]
    assert steps == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"status": "running"})
    with pytest.raises(TypeError):
        write_json(path, {"status": object()})  # fails half-way through serializing
    assert json.loads(path.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
