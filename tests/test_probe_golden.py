"""Every probe tag logs the values it logged before: a probed run's event-file scalars and
histograms against a golden file (``golden/probed_run.json``).

The golden file was recorded from the code before the probes became plugins (issue 21) and is
re-recorded only for a deliberate change (of a probe's math, or of training's arithmetic, below):
``python -m tests.test_probe_golden``.

Tolerance: with ``threads=1`` a run repeats itself bit for bit on one machine and torch build.
The tolerance, relative 1e-4 and absolute 1e-6 (for values near 0, such as the median of a
normalized activation), admits a probe computing the same formula in another order (since the
recording, ``act/`` and ``bnstats/`` take their per-channel moments from the norm layers'
shared functions: their values moved by at most 3 % of the tolerance, the rest is bit for bit),
and the custom-BN run's trajectory under another reduction order of training (``threads=2``
moves its values by at most 0.4 of the tolerance). A histogram's ``sum`` of ``num`` values
inherits each value's absolute tolerance, ``num`` x 1e-6: the sum of a normalized activation is
zero up to float32 cancellation, which another CPU's reduction order moves by ~1e-5 (CI's did
at step 0). A changed formula, a changed input or a probe
at another step moves values by far more. Decorrelated BN's eigendecompositions amplify a
changed reduction order of *training* to up to 1e-2 relative (``threads=2``): when the training
arithmetic itself changes (torch, CPU, the layers' code), re-record the file with the probes'
code unchanged.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli import bnlab, tiny

GOLDEN = Path(__file__).resolve().parent / "golden" / "probed_run.json"
RTOL, ATOL = 1e-4, 1e-6
# The tag groups of the probes (train/, test/, opt/lr and hparam/ are the loop's own).
GROUPS = ("act", "drift", "grad", "opt", "ics", "landscape", "white", "bnstats")
# probe=full with every interval 5 (each probe fires at steps 0/5/10 or 5/10), one epoch of
# 10 steps; custom BN with dropout under the fixed probe seed, decorrelated BN under a seed
# by step.
PROBES = ("probe=full", "probe.act_every=5", "probe.hist_every=5", "probe.ics_every=5",
          "probe.landscape_every=5", "probe.white_every=5", "probe.bnstats_every=5",
          "probe.batch_size=20", "epochs=1")
RUNS = {"custom": ("norm=custom", "model.dropout=0.3"),
        "dbn": ("norm=dbn", "probe.act_seed=step")}


def probe_events(run_dir: Path) -> dict[str, list[list[float]]]:
    """Each probe tag's ``[step, value]`` points; for a histogram ``[step, num, sum,
    sum_squares, min, max]``."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    found: dict[str, list[list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.split("/", 1)[0] in GROUPS and tag != "opt/lr":
            found[tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in acc.Tags()["histograms"]:
        found[tag] = [[e.step, h.num, h.sum, h.sum_squares, h.min, h.max]
                      for e in acc.Histograms(tag) for h in [e.histogram_value]]
    return found


def probed_run(tmp_path: Path, cifar_root: Path, name: str) -> dict[str, list[list[float]]]:
    run_dir = tmp_path / name
    r = bnlab("train", *tiny(cifar_root, *RUNS[name], *PROBES, f"hydra.run.dir={run_dir}"),
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return probe_events(run_dir)


def _atols(point: list[float]) -> list[float]:
    """The absolute tolerance of each value of a point: a histogram's sum (of ``num`` values),
    its second field, has ``num`` times each value's."""
    if len(point) == 2:
        return [ATOL]
    return [ATOL, ATOL * point[1], ATOL, ATOL, ATOL]


def _close(a: float, b: float, atol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_every_probe_tag_logs_its_golden_values(tmp_path, cifar_root, name):
    golden = json.loads(GOLDEN.read_text())["runs"][name]
    logged = probed_run(tmp_path, cifar_root, name)
    # tags of later probes may be added; every recorded group keeps exactly its tags
    groups = {tag.split("/", 1)[0] for tag in golden}
    assert {t for t in logged if t.split("/", 1)[0] in groups} == set(golden)
    assert len(golden) > 100  # every group of this run, per layer and parameter
    wrong = []
    for tag, points in golden.items():
        got = logged[tag]
        if [p[0] for p in got] != [p[0] for p in points]:
            wrong.append(f"{tag}: steps {[p[0] for p in got]} != {[p[0] for p in points]}")
            continue
        for g, p in zip(got, points, strict=True):
            if not all(_close(a, b, atol) for a, b, atol in
                       zip(g[1:], p[1:], _atols(p), strict=True)):
                wrong.append(f"{tag} at step {p[0]}: {g[1:]} != golden {p[1:]}")
    assert not wrong, f"{len(wrong)} values differ, e.g.\n" + "\n".join(wrong[:10])


def record() -> None:
    """Re-record the golden file (only for a deliberate change of a probe's math)."""
    from tests.cifar_files import write_cifar

    with tempfile.TemporaryDirectory() as tmp:
        root = write_cifar(Path(tmp) / "cifar")
        runs = {name: probed_run(Path(tmp), root, name) for name in RUNS}
    GOLDEN.parent.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=GOLDEN.parent).stdout.strip()
    document = {"recorded_by": "python -m tests.test_probe_golden", "commit": commit,
                "runs": runs}
    GOLDEN.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    print(f"wrote {GOLDEN} ({sum(len(r) for r in runs.values())} tags)", file=sys.stderr)


if __name__ == "__main__":
    record()
