#!/usr/bin/env bash
# Each norm's learning-rate limit in one run per seed: the learning-rate range test (Smith 2017;
# fastai's lr_find). The lr grows exponentially from sched.lr_min to sched.lr_max over the run;
# bnlab's divergence rule (loss non-finite or above diverge_factor x its first value) stops it
# and metrics.json records lr_at_divergence. Every norm of bnlab, none included, 3 seeds.
# Check: for custom, torch and none, lr at divergence against the grid-based maximum stable lr
# of the lr-stability study (docs/reproductions.md section 1: none 0.03, i.e. diverges at 0.1;
# custom and torch: no divergence up to 3). The two protocols differ -- the range test
# reaches an lr after many steps at smaller ones (a warm-up), the grid starts at it -- so
# the range test is expected to read higher, not equal.
#
#   bash scripts/study_lr_range.sh                   # CIFAR-10 subset on CPU, 3 seeds
#   THREADS=1 bash scripts/study_lr_range.sh
#   FULL=1 DATA_ROOT=data bash scripts/study_lr_range.sh
#   SMOKE=1 bash scripts/study_lr_range.sh
# Results: outputs/repro/lr_range/{table.md,study.md,lr_range.png}; figure
# docs/figures/lr_range.png
REPRO_NAME=lr_range
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# The preset (configs/experiment/lr_range.yaml): 1e-4 -> 100 over 3 epochs, every norm,
# seeds 0,1,2, probes off. Subset: 2 epochs of all 10k images (156 steps, the lr x1.09 a step,
# about 11 steps per decade: the reading is good to ~10 %). A run stops at divergence, so
# the stable norms cost the most. Smoke: the preset on 512 synthetic images.
EPOCHS=${EPOCHS:-$(pick 2 3)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
sweep grid experiment=lr_range \
    "seed=$(seeds 0,1,2 0,1,2)" \
    "epochs=$EPOCHS" \
    "data.train_size=$TRAIN_SIZE" \
    "model=$(pick cnn vgg11)"

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"

# lr at divergence per norm (compare's column, if present, has the same numbers); the step and
# status too, since a run that never diverges has no lr at divergence (it reached lr_max).
study_table "$OUT_DIR"/grid/*/ -- m:lr_at_divergence m:diverged_step m:steps \
    | tee "$OUT_DIR/study.md"

# bnlab's divergence rule only fires when the loss explodes; a BN net can stop learning long
# before that (its scale invariance keeps the loss bounded). So also read two points off each
# run's training-loss curve against the lr (the range test's usual read-outs; the loss is
# smoothed with an EMA of factor 0.8 over the steps): the lr at the smoothed loss's minimum,
# and the first lr after that minimum where the smoothed loss is back above chance level
# (ln 10 = 2.30 for 10 classes: "stops learning"). Geometric mean and the range over seeds;
# "–": the curve never got there before the run ended. (A diverged run trains on to the next
# divergence check, up to log_every steps, so the curves go a little past lr_at_divergence.)
python - "$OUT_DIR" <<'PY' | tee -a "$OUT_DIR/study.md"
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from bnlab.analysis.events import read_events

out = Path(sys.argv[1])
rows = defaultdict(lambda: defaultdict(list))
for m in sorted(out.glob("grid/*/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") not in ("completed", "diverged"):
        continue
    ev = read_events(m.parent, histograms=False)
    loss, lrs = ev.scalars.get("train/loss"), ev.scalars.get("opt/lr")
    if loss is None or lrs is None:
        continue
    lr = np.interp(loss.steps, lrs.steps, lrs.values)
    smooth, s = [], None
    for v in loss.values:
        v = v if np.isfinite(v) else 1e9
        s = v if s is None else 0.8 * s + 0.2 * v
        smooth.append(s)
    smooth = np.array(smooth)
    i_min = int(np.argmin(smooth))
    above = np.nonzero(smooth[i_min:] > math.log(10))[0]
    r = rows[metrics["config"]["norm"]]
    r["div"].append(metrics.get("lr_at_divergence"))
    r["min"].append(float(lr[i_min]))
    r["stop"].append(float(lr[i_min + above[0]]) if above.size else None)


def geo(values):
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    text = f"{math.exp(np.mean(np.log(v))):.3g}"
    if len(v) > 1:
        text += f" [{min(v):.3g}–{max(v):.3g}]"
    return text + (f" ({len(v)}/{len(values)})" if len(v) != len(values) else "")


print()
print("| norm | seeds | lr at divergence | lr at min smoothed loss | lr where loss > ln 10 |")
print("|---|---|---|---|---|")
for norm in sorted(rows, key=lambda n: -math.exp(np.mean(np.log(rows[n]["min"])))):
    r = rows[norm]
    print(f"| {norm} | {len(r['min'])} | {geo(r['div'])} | {geo(r['min'])} | {geo(r['stop'])} |")
PY

# Figure: the training loss against the lr for seed 0, one curve per norm (the range test's
# usual plot), and lr at divergence per norm, every seed.
python - "$OUT_DIR" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnlab.analysis.events import read_events

out = Path(sys.argv[1])
fig = Figure(figsize=(11, 4.0))
left, right = fig.subplots(1, 2)
runs = []
for m in sorted(out.glob("grid/*/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") in ("completed", "diverged"):
        runs.append((m.parent, metrics))
norms = sorted({mt["config"]["norm"] for _, mt in runs})
for d, mt in runs:
    norm, seed = mt["config"]["norm"], mt["config"]["seed"]
    i = norms.index(norm)
    lr = mt.get("lr_at_divergence")
    right.scatter([lr if lr is not None else np.nan], [i + 0.15 * (seed - 1)], color=f"C{i % 10}")
    if seed != 0:
        continue
    ev = read_events(d, histograms=False)
    loss, lrs = ev.scalars.get("train/loss"), ev.scalars.get("opt/lr")
    if loss is None or lrs is None:
        continue
    x = np.interp(loss.steps, lrs.steps, lrs.values)
    y = np.clip(loss.values, 0, 20)
    left.plot(x, y, color=f"C{i % 10}", linestyle="-" if i < 10 else "--",
              linewidth=3 if norm == "custom" else 1.2, label=norm)
left.set_xscale("log")
left.set_xlabel("learning rate")
left.set_ylabel("training loss (clipped at 20), seed 0")
left.grid(True, alpha=0.3)
left.legend(fontsize="x-small", ncol=2)
right.set_xscale("log")
right.set_yticks(range(len(norms)), labels=norms)
right.set_xlabel("lr at divergence (each seed a dot)")
right.grid(True, alpha=0.3)
fig.suptitle("Learning-rate range test")
fig.tight_layout()
fig.savefig(out / "lr_range.png", dpi=80)
PY
publish "$OUT_DIR/lr_range.png" lr_range
