#!/usr/bin/env bash
# Train/eval mismatch and Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
# Sec. 3). BN evaluates with running statistics, an exponential moving average (EMA) of batch
# statistics taken while the weights moved. They misrepresent the population statistics of the
# current network (i) early in training and at a high learning rate, when the weights move fast
# and the EMA lags, (ii) with a large EMA momentum, when the EMA is the mean of only the last
# few, noisy batches, and (iii) with small batches, whose statistics are noisy. Precise BN
# recomputes them at fixed weights from many training batches. Wu & Johnson, ResNet-50 on
# ImageNet: Precise BN from ~10^4 samples gives +0.3 % at batch 1024 and 100 epochs and much
# more when the EMA is poor (large momentum, small batches, early in training: their Fig. 3/4).
#
# This study trains custom and torch BN with (batch, momentum) in {128} x {0.01, 0.1, 0.9}
# and {16} x {0.1, 0.9} (small batch, and small batch with a one-batch EMA), evaluates every epoch both with the EMA and with Precise BN
# from PRECISE_IMAGES training images (eval.precise_bn_batches = PRECISE_IMAGES / batch), and
# probes the batch-vs-running mismatch (bnstats/, on a fixed probe batch of 256 test images).
#
#   bash scripts/study_precise_bn.sh                 # CIFAR-10 subset on CPU, 3 seeds
#   SEEDS=0,1 EPOCHS=3 THREADS=1 bash scripts/study_precise_bn.sh
#   FULL=1 DATA_ROOT=data bash scripts/study_precise_bn.sh
#   SMOKE=1 bash scripts/study_precise_bn.sh
# Results: outputs/repro/precise_bn/{table.md,study.md,*.png}; figure
# docs/figures/precise_bn.png
REPRO_NAME=precise_bn
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

EPOCHS=${EPOCHS:-$(pick 8 30)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
# 6,400 images: 50 batches of 128 (Wu & Johnson's "~10^4 samples" order of magnitude, at this
# data size two thirds of the training set), 400 of 16. Smoke: 2 batches.
PRECISE_IMAGES=${PRECISE_IMAGES:-$(pick 6400 12800 256)}
# lr 0.1, the best BN lr of the lr-stability study: weights move fast early, where the EMA
# lags most. Cosine schedule (bnlab's default) so the end of training is the usual regime in
# which the EMA has caught up -- Precise BN should matter early and less at the end.
LR=0.1

# Job dirs are named norm=...,seed=... under one sweep dir per (batch, momentum): the default
# names (every override) exceed the 255-character file-name limit here.
for setting in "128 0.01" "128 0.1" "128 0.9" "16 0.1" "16 0.9"; do
    read -r batch momentum <<< "$setting"
    lr=$(python -c "print(f'{$LR * $batch / 128:.6g}')")  # linear scaling, as study_small_batch
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    sweep "grid/batch_${batch}_momentum_$momentum" \
        "seed=$(seeds 0,1,2 0,1,2)" \
        norm=custom,torch \
        "norm.momentum=$momentum" \
        "batch_size=$batch" \
        "optim.lr=$lr" \
        "epochs=$EPOCHS" \
        "data.train_size=$TRAIN_SIZE" \
        "model=$(pick cnn resnet20)" \
        "eval.precise_bn_batches=$((PRECISE_IMAGES / batch))" \
        probe.act_every=0 probe.hist_every=0 probe.white_every=0 probe.grad_every=0 \
        "probe.bnstats_every=$(pick 20 200 2)" \
        'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
done

bnlab compare "$OUT_DIR"/grid --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"

# Per epoch: EMA accuracy, Precise-BN accuracy and their difference; bnstats mismatch at the
# first probes (early training) and at the last.
E=$(pick "$EPOCHS" "$EPOCHS" 1)
EARLY=$(pick 20 200 2)  # the first probe after step 0
COLS=()
for ((e = 1; e <= E; e++)); do
    i=${#COLS[@]}
    COLS+=("h:test_acc@$e" "h:test_acc_precise_bn@$e" "d:$((i + 1))-$i")
done
study_table "$OUT_DIR"/grid/*/*/ -- "${COLS[@]}" | tee "$OUT_DIR/study.md"
{
    echo
    echo "Batch-vs-running statistics mismatch (mean over norm layers) on the probe batch: at step $EARLY (early), mean over the run, at the last probe:"
    echo
    study_table "$OUT_DIR"/grid/*/*/ -- \
        "e:bnstats/mean_shift/:at=$EARLY" e:bnstats/mean_shift/ e:bnstats/mean_shift/:last \
        "e:bnstats/log_var_ratio/:at=$EARLY" e:bnstats/log_var_ratio/ \
        e:bnstats/log_var_ratio/:last
} | tee -a "$OUT_DIR/study.md"

# Figure: per epoch, EMA vs Precise BN test accuracy (left) and the mismatch over steps
# (right), mean over seeds, one colour per setting, custom only (torch overlays it).
python - "$OUT_DIR" <<'PY'
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnlab.analysis.events import read_events

out = Path(sys.argv[1])
hist = defaultdict(list)
shift = defaultdict(list)
for m in sorted(out.glob("grid/*/*/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") != "completed" or metrics["config"]["norm"] != "custom":
        continue
    label = m.parent.parent.name
    hist[label].append([(h["test_acc"], h.get("test_acc_precise_bn")) for h in metrics["history"]])
    events = read_events(m.parent, histograms=False)
    tags = events.tags("bnstats/mean_shift/")
    if tags:
        s = events.scalars[tags[0]].steps
        shift[label].append((s, np.mean([events.scalars[t].values for t in tags], axis=0)))
fig = Figure(figsize=(10, 3.8))
left, right = fig.subplots(1, 2)
for i, label in enumerate(sorted(hist)):
    n = min(len(r) for r in hist[label])
    a = 100 * np.array([[x if x is not None else np.nan for x in pair]
                        for r in hist[label] for pair in r[:n]]).reshape(len(hist[label]), n, 2)
    ep = np.arange(1, n + 1)
    left.plot(ep, a[:, :, 0].mean(0), color=f"C{i}", marker="o", label=f"{label} EMA")
    left.plot(ep, a[:, :, 1].mean(0), color=f"C{i}", marker="s", linestyle="--",
              label=f"{label} Precise BN")
    for steps, values in shift[label][:1]:
        right.plot(steps, values, color=f"C{i}", label=label)
left.set_xlabel("epoch")
left.set_ylabel("test accuracy % (custom BN, mean over seeds)")
left.grid(True, alpha=0.3)
left.legend(fontsize="x-small")
right.set_xlabel("step")
right.set_ylabel("bnstats/mean_shift, mean over layers (seed 0)")
right.set_yscale("log")
right.grid(True, alpha=0.3)
right.legend(fontsize="x-small")
fig.suptitle("EMA vs Precise BN evaluation, and the batch-vs-running mismatch")
fig.tight_layout()
fig.savefig(out / "precise_bn.png", dpi=80)
PY
publish "$OUT_DIR/precise_bn.png" precise_bn
