#!/usr/bin/env bash
# Small batches. Wu & He 2018 (Group Norm), Fig. 1: ResNet-50 on ImageNet, BN's validation
# error rises as the batch per worker shrinks from 32 to 2 (23.6 % -> 34.7 %) while Group Norm's
# stays flat (24.1 % -> 24.8 %). Ioffe 2017 (Batch Renorm): at micro-batches of 4, Batch Renorm
# recovers most of BN's loss (Inception v3, 76.5 % vs BN's 74.2 %, BN at batch 32: 78.3 %).
# This study trains norm in {custom, torch, renorm, group} x batch in {2, 4, 8, 16, 32, 128}
# with the learning rate scaled linearly with the batch (Goyal et al. 2017: lr = base x
# batch / 128, base 0.1, the best BN lr of the lr-stability study) for the same number of
# epochs, so every run sees the same images the same number of times.
#
# Ghost BN is run differently: at batch <= virtual_batch_size it *is* plain BN (one virtual
# batch per batch), so sweeping it over the same batch grid would repeat custom BN. Instead it
# is trained at batch 128 (lr 0.1) with virtual_batch_size in {2, 4, 8, 16, 32, 128}: the
# normalization sees as few samples as small-batch BN does while the optimizer keeps batch
# 128's gradient noise and learning rate. Comparing that row with BN's small-batch row separates
# the two effects of a small batch: noisy normalization statistics vs a noisier, smaller SGD
# step. (vbs 128 is plain BN at batch 128.)
#
#   bash scripts/study_small_batch.sh                # CIFAR-10 subset on CPU, 3 seeds
#   SEEDS=0,1 EPOCHS=2 TRAIN_SIZE=4000 THREADS=1 bash scripts/study_small_batch.sh
#   FULL=1 DATA_ROOT=data bash scripts/study_small_batch.sh   # full CIFAR-10, GPU
#   SMOKE=1 bash scripts/study_small_batch.sh        # pipeline check
# Results: outputs/repro/small_batch/{table.md,study.md,*.png}; figure
# docs/figures/small_batch.png
REPRO_NAME=small_batch
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# Batch 2 on 10k images is 5,000 steps an epoch; per-step overhead dominates there (about
# 10 ms a step on one CPU thread, 2.5x BN's per-image cost at batch 128), so the whole grid
# costs about 1 h per seed at the defaults with THREADS=1 (measured: 8 min a seed at
# TRAIN_SIZE=2000 EPOCHS=3). TRAIN_SIZE= and EPOCHS=
# shrink it; the same epochs for every batch keep the comparison fair.
EPOCHS=${EPOCHS:-$(pick 5 20)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
BASE_LR=${BASE_LR:-0.1}
# Another base lr gets its own sweep dirs (grid_base<lr>/, ghost_base<lr>/), so that runs at
# several base lrs sit side by side and the tables and figure show them all.
if [[ $BASE_LR == 0.1 ]]; then SUFFIX=""; else SUFFIX="_base$BASE_LR"; fi
BATCHES=${BATCHES:-2,4,8,16,32,128}
# Group Norm: 4 groups (the cnn's 32/64/128/256 channels); Wu & He use 32 groups of ResNet's
# 64-2048 channels -- 4 keeps at least 8 channels a group in the first layer.
# Probes off except the batch-vs-running statistics mismatch, cheap and exactly what degrades
# for BN at small batches.

lr_for() {  # linear scaling: base x batch / 128
    python -c "print(f'{$BASE_LR * $1 / 128:.6g}')"
}

# Job dirs are named norm=...,seed=... under one sweep dir per batch size (ghost: vbs=...): the
# default names (every override) come close to the 255-character file-name limit.
IFS=, read -r -a batch_list <<< "$BATCHES"
for b in "${batch_list[@]}"; do
    # One sweep per batch size: the lr depends on it, and Hydra's grid cannot pair two keys.
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    sweep "grid$SUFFIX/batch_$b" \
        "seed=$(seeds 0,1,2 0,1,2)" \
        norm=custom,torch,renorm,group \
        "batch_size=$b" \
        "optim.lr=$(lr_for "$b")" \
        "epochs=$EPOCHS" \
        "data.train_size=$TRAIN_SIZE" \
        "model=$(pick cnn resnet20)" \
        probe.act_every=0 probe.hist_every=0 probe.white_every=0 probe.grad_every=0 \
        "probe.bnstats_every=$(pick 100 500 50)" \
        'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
done
# Ghost BN at batch 128, normalizing over virtual batches of 2-128.
# shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
sweep "ghost$SUFFIX" norm=ghost \
    "seed=$(seeds 0,1,2 0,1,2)" \
    "norm.virtual_batch_size=$BATCHES" \
    batch_size=128 "optim.lr=$BASE_LR" \
    "epochs=$EPOCHS" \
    "data.train_size=$TRAIN_SIZE" \
    "model=$(pick cnn resnet20)" \
    probe.act_every=0 probe.hist_every=0 probe.white_every=0 probe.grad_every=0 \
    "probe.bnstats_every=$(pick 100 500 50)" \
    'hydra.sweep.subdir="vbs=${norm.virtual_batch_size},seed=${seed}"'

bnlab compare "$OUT_DIR"/grid* "$OUT_DIR"/ghost* --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"

study_table "$OUT_DIR"/grid*/*/*/ "$OUT_DIR"/ghost*/*/ -- \
    m:final_test_acc m:final_train_acc e:bnstats/mean_shift/:last e:bnstats/log_var_ratio/:last \
    m:images_per_s | tee "$OUT_DIR/study.md"

# Wu & He's Fig. 1 axes: error vs batch size, one line per norm (mean ± std over seeds); Ghost
# BN against its virtual batch size on the same x axis.
python - "$OUT_DIR" <<'PY'
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

out = Path(sys.argv[1])
acc = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # base -> label -> batch
for m in sorted(out.glob("*/**/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") not in ("completed", "diverged"):
        continue
    cfg = metrics["config"]
    hydra = (m.parent / ".hydra" / "overrides.yaml").read_text()
    if cfg["norm"] == "ghost":
        vbs = int(next(line.split("=")[1] for line in hydra.splitlines()
                       if "virtual_batch_size" in line))
        label, batch = "ghost (batch 128, x = virtual batch)", vbs
    else:
        label, batch = cfg["norm"], cfg["batch_size"]
    value = metrics.get("final_test_acc")
    base = 128 * cfg["lr"] / (128 if cfg["norm"] == "ghost" else cfg["batch_size"])
    acc[f"{base:.3g}"][label][batch].append(100 * (1 - value) if value is not None else np.nan)
fig = Figure(figsize=(5.8 * len(acc), 4.0))
axes = fig.subplots(1, len(acc), squeeze=False)[0]
for ax, (base, by_label) in zip(axes, sorted(acc.items(), key=lambda kv: -float(kv[0]))):
    for i, (label, by_batch) in enumerate(sorted(by_label.items())):
        xs = sorted(by_batch)
        err = [np.nanmean(by_batch[x]) for x in xs]
        std = [np.nanstd(by_batch[x]) for x in xs]
        ax.errorbar(xs, err, yerr=std, marker="o", capsize=2, color=f"C{i}",
                    linewidth=3 if label == "custom" else 1.3,
                    linestyle="--" if label.startswith("ghost") else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16, 32, 128], labels=["2", "4", "8", "16", "32", "128"])
    ax.set_xlabel(f"batch size (lr = {base} x batch / 128)")
    ax.set_ylabel("test error % (mean ± std over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"Test error vs batch size, base lr {base}")
fig.suptitle("Wu & He 2018, Fig. 1 axes")
fig.tight_layout()
fig.savefig(out / "small_batch.png", dpi=80)
PY
publish "$OUT_DIR/small_batch.png" small_batch
