#!/usr/bin/env bash
# Loss landscape along the gradient (Santurkar et al. 2018, Sec. 3.1, Fig. 4): at points along
# training, step along -gradient by several step sizes and record the loss variation, the
# gradient predictiveness (change of the gradient) and the effective beta-smoothness. Expected:
# all three are markedly smaller with BN -- a smoother, more predictable landscape.
#
#   bash scripts/reproduce_landscape.sh               # CIFAR-10 subset on CPU
#   FULL=1 DATA_ROOT=data bash scripts/reproduce_landscape.sh   # full CIFAR-10, VGG16, GPU
#   SMOKE=1 bash scripts/reproduce_landscape.sh
# Results: outputs/repro/landscape/{table.md,landscape.png,landscape.md};
# figure docs/figures/landscape.png
REPRO_NAME=landscape
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# Each measurement costs probe.landscape_points (8) extra forward/backward passes, so it is
# taken every few steps with the activation probes off. Step sizes: the probe default,
# 0.5-4 x the base learning rate (optim.lr), the same all run.
# lr 0.01 for every norm: the lr at which the cnn trains without BN (it diverges at
# lr 0.05 and above; see reproduce_lr_stability.sh), so that all variants
# share one learning rate and differ only in the norm. A constant lr: under the default
# cosine schedule the lr -> 0 at the end, where every update (hence ICS) vanishes, and the
# landscape would be probed at points the optimizer no longer moves between.
sweep grid \
    "model=$(pick cnn vgg16)" \
    norm=custom,torch,none \
    optim.lr=0.01 \
    sched=constant \
    "seed=$(seeds 0 0,1)" \
    "epochs=$(pick 3 10)" \
    "data.train_size=$(pick 2000 null)" \
    "probe.landscape_every=$(pick 5 100 2)" \
    probe.act_every=0 probe.hist_every=0

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"
# bnlab plot does not draw landscape/* tags: scalar_figure (repro_common.sh) overlays them.
scalar_figure "$OUT_DIR/landscape.png" "Loss landscape along the gradient (Santurkar et al. Fig. 4)" \
    landscape/loss_range,landscape/grad_pred,landscape/beta "$OUT_DIR"/grid/*/ \
    | tee "$OUT_DIR/landscape.md"
publish "$OUT_DIR/landscape.png" landscape
