#!/usr/bin/env bash
# Noisy BN (Santurkar et al. 2018, Sec. 2.1, Fig. 2): BN followed by random per-step shifts and
# scalings of each activation (configs/norm/noisy.yaml). Expected: noisy BN trains about as
# well as BN and better than no BN, although its activations drift more than either -- so
# reducing internal covariate shift is not what makes BN work.
#
#   bash scripts/reproduce_noisy_bn.sh                # CIFAR-10 subset on CPU
#   FULL=1 DATA_ROOT=data bash scripts/reproduce_noisy_bn.sh   # full CIFAR-10, VGG16, GPU
#   SMOKE=1 bash scripts/reproduce_noisy_bn.sh
# Results: outputs/repro/noisy_bn/{table.md,drift.png}; figure docs/figures/noisy_bn.png
REPRO_NAME=noisy_bn
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

MODEL=$(pick cnn vgg16)
# The deepest hidden slot of each model (the paper shows an early, a middle and a late layer;
# bnlab plot's default picks would mix slot inputs and outputs).
if [[ $MODEL == cnn ]]; then DEEP=classifier.1; else DEEP=classifier.4; fi

# The preset (configs/experiment/noisy_bn.yaml) is custom, noisy, none x seeds 0,1 with the
# default probes; torch BN is added as the check on custom BN. Activations every 10 steps, so
# the drift column (W1 between consecutive probes) has enough points on the short subset run.
# lr 0.01 for every norm: the lr at which the cnn trains without BN (it diverges at
# lr 0.05 and above; see reproduce_lr_stability.sh), so that all variants
# share one learning rate and differ only in the norm.
sweep grid experiment=noisy_bn \
    "model=$MODEL" \
    norm=custom,torch,noisy,none \
    optim.lr=0.01 \
    "seed=$(seeds 0,1 0,1,2)" \
    "epochs=$(pick 4 30)" \
    "data.train_size=$(pick 3000 null)" \
    "probe.act_every=$(pick 10 50 1)" \
    "probe.hist_every=$(pick 50 1000 2)"

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"
# Columns: BN, noisy BN, no BN (seed 0); rows: the deep layer's percentile band, gradient
# norm, drift and histogram snapshots.
bnlab plot "$(run_dir grid '*norm=custom,*seed=0')" "$(run_dir grid '*norm=noisy,*seed=0')" \
    "$(run_dir grid '*norm=none,*seed=0')" --layer "$DEEP" --out "$OUT_DIR/drift.png"
publish "$OUT_DIR/drift.png" noisy_bn
