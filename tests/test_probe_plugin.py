"""The probe plugin: what is derived from the probes' declarations (the ``probe`` schema,
``configs/probe/default.yaml``, README's tag table, ``compare`` columns, ``plot`` rows, the
interval warning) and that the declarations are what the probes log.

``python -m tests.test_probe_plugin`` rewrites ``configs/probe/default.yaml`` from the
declarations.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bnlab.analysis import plot, summary, tables, training_figure
from bnlab.probes.base import PROBES, Measurements, Probe, registered
from bnlab.probes.config import ProbeConfig, SharedKeys, default_yaml, warn_long_intervals
from bnlab.registry import Schema
from tests.test_probes import make_probes, sgd, tags, tiny_model, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "probe" / "default.yaml"
LOOP_TAGS = {"opt/lr"}  # the training loop's own tags in the probes' groups


def test_the_probes_and_their_order():
    # the order of compare columns and plot rows, and of the measurements within a step
    assert [p.name for p in registered()] == ["grad", "act", "ics", "landscape", "white",
                                              "bnstats", "gram", "scale"]
    # a module with a probe that PROBES does not list would never run
    with_probe = {path.stem for path in (ROOT / "bnlab" / "probes").glob("*.py")
                  if any(isinstance(node, ast.ClassDef) and "Probe" in map(ast.unparse, node.bases)
                         for node in ast.walk(ast.parse(path.read_text())))}
    assert with_probe == set(PROBES)


def test_the_schema_is_the_shared_keys_and_every_probes_keys():
    keys = [*SharedKeys.model_fields, *(k for p in registered() for k in p.Keys.model_fields)]
    assert list(ProbeConfig.model_fields) == keys
    assert {p.name for p in registered()} <= {k.removesuffix("_every") for k in keys}
    # every key has a default and says what it is and what is allowed (errors quote it)
    for key, field in ProbeConfig.model_fields.items():
        assert not field.is_required() and field.description, key


def test_default_yaml_is_written_from_the_declarations():
    assert DEFAULT_YAML.read_text() == default_yaml(), \
        "configs/probe/default.yaml is stale: run python -m tests.test_probe_plugin"
    assert OmegaConf.to_container(OmegaConf.load(DEFAULT_YAML)) == ProbeConfig().model_dump()


def _readme_tag_rows() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## TensorBoard tags", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_readme_tag_table_holds_every_declared_tag_with_its_meaning():
    declared = [f"| `{tag}` | {meaning.replace('|', chr(92) + '|')} |"
                for probe in registered() for tag, meaning in probe.tags.items()]
    rows = _readme_tag_rows()
    expected = "README's tag table should hold these rows, in this order:\n" + "\n".join(declared)
    assert declared[0] in rows, expected
    start = rows.index(declared[0])
    assert rows[start:start + len(declared)] == declared, expected
    groups = {tag.split("/", 1)[0] for probe in registered() for tag in probe.tags}
    for row in rows[:start] + rows[start + len(declared):]:  # the loop's own, no stale probe tag
        for tag in re.findall(r"`([^`]+)`", row.split("|")[1]):
            assert tag.split("/", 1)[0] not in groups or tag in LOOP_TAGS, row


def _pattern(declared: str) -> re.Pattern:
    """``act/p15/<layer>`` matches ``act/p15/`` and a module path (re.escape keeps ``<>``)."""
    return re.compile(re.sub(r"<\w+>", "[^/]+", re.escape(declared)) + "$")


@pytest.mark.parametrize("norm", ["torch", "dbn"])
def test_every_logged_tag_is_declared(norm):
    """With every interval at 1, what the probes log is what they declare (bnstats/ logs the
    whitening distance for decorrelated BN, the variance ratio otherwise)."""
    patterns = {tag: _pattern(tag) for probe in registered() for tag in probe.tags}
    every = {key: 1 for key in ProbeConfig.model_fields if key.endswith("_every")}
    model = tiny_model(norm)
    optimizer = sgd(model)
    probes = make_probes(model, optimizer, **every, landscape_points=2, hist_samples=64,
                         batch_size=8)
    _, said = train(model, optimizer, probes, steps=1)
    logged = tags(said)
    unmatched = [t for t in logged if not any(p.match(t) for p in patterns.values())]
    assert not unmatched
    never = {d for d, p in patterns.items() if not any(p.match(t) for t in logged)}
    # (sgd() is Nesterov's, for which scale/ has no equilibrium prediction: test_scale_gram_
    # probes.py logs those two)
    assert never == {"bnstats/log_var_ratio/<norm>" if norm == "dbn"
                     else "bnstats/whitening_dist/<norm>",
                     "scale/angle_ratio/<module>", "scale/angle_pred"}
    histograms = {t for _, m in said for t in m.histograms}
    assert histograms and all(t.startswith("act/hist/") for t in histograms)


def test_compare_columns_and_plot_rows_are_the_declared_ones_in_the_old_formats():
    """The tables' columns and the figure's rows as they were before they were declared."""
    assert list(tables.COLUMNS.items())[:11] == [
        ("final_test_acc", ("final test acc %", True)),
        ("final_test_acc_precise_bn", ("final test acc % (precise BN)", True)),
        ("best_test_acc", ("best test acc %", True)), ("gap", ("train-test gap %", True)),
        ("lr_at_divergence", ("lr at divergence", False)),
        ("peak_grad_norm", ("peak grad norm", False)), ("drift_w1", ("act drift W1", False)),
        ("ics_l2", ("ICS l2", False)), ("ics_cos", ("ICS cos", False)),
        ("white_offdiag", ("final off-diag corr (deepest)", False)),
        ("bnstats_mean_shift", ("final BN mean shift", False))]
    assert tuple(tables.COLUMNS) == summary.METRICS
    assert tables.OPTIONAL[:4] == ("final_test_acc_precise_bn", "lr_at_divergence",
                                   "white_offdiag", "bnstats_mean_shift")
    assert list(training_figure.LINE_ROWS)[:9] == [
        "drift/w1/", "ics/l2/", "ics/cos/", "white/offdiag_corr/", "white/erank_frac/",
        "white/cond/", "bnstats/mean_shift/", "bnstats/log_var_ratio/", "bnstats/whitening_dist/"]
    assert training_figure.LINE_ROWS["white/cond/"] == "whiteness: condition\nnumber (log)"
    assert training_figure.LOG_ROWS[0] == "white/cond/"
    assert plot.LAYER_GROUPS[:5] == ("act", "drift", "ics", "white", "bnstats")


def test_long_intervals_are_said_once_each(caplog):
    """Each interval longer than the run: a probe-batch probe is measured at step 0 only."""
    cfg = OmegaConf.create({**ProbeConfig().model_dump(), "grad_every": 30, "ics_every": 5})
    with caplog.at_level(logging.WARNING, logger="bnlab.probes.config"):
        warn_long_intervals(cfg, 20)
    assert caplog.messages == [
        "probe.grad_every=30 is longer than this run (20 steps): grad is not measured",
        "probe.act_every=100 is longer than this run (20 steps): act is measured at step 0 only",
        "probe.hist_every=500 is longer than this run (20 steps): hist is measured at step 0 "
        "only",
        "probe.white_every=500 is longer than this run (20 steps): white is measured at step 0 "
        "only",
        "probe.bnstats_every=500 is longer than this run (20 steps): bnstats is measured at "
        "step 0 only"]


def test_a_probe_declaration_is_checked_when_its_class_is_made():
    class NoInterval(Schema):
        size: int = 1

    class Interval(Schema):
        mine_every: int = 0

    with pytest.raises(TypeError, match="Keys has no interval key mine_every"):
        type("Mine", (Probe,), {"name": "mine", "Keys": NoInterval, "runs": (), "tags": {}})
    with pytest.raises(TypeError, match="runs at after_step but has no after_step"):
        type("Mine", (Probe,), {"name": "mine", "Keys": Interval, "runs": ("after_step",),
                                "tags": {}, "measure": lambda self, step: Measurements()})
    with pytest.raises(TypeError, match="two probes named act"):
        type("Mine", (Probe,), {"name": "act", "Keys": registered()[1].Keys, "runs": (),
                                "tags": {}})
    assert "mine" not in {p.name for p in registered()}


if __name__ == "__main__":
    DEFAULT_YAML.write_text(default_yaml())
    print(f"wrote {DEFAULT_YAML}", file=sys.stderr)
