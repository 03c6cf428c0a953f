#!/usr/bin/env bash
# Dropout with and without BN (Ioffe & Szegedy 2015, Sec. 3.4 and 4.2.1: BN regularizes, so
# dropout "may be unnecessary" / can be removed or reduced). Measured: final test accuracy and
# the train-test accuracy gap per norm x dropout rate (0, 0.2, 0.5). Expected: BN helps test
# accuracy; dropout narrows the gap in every variant; with BN, dropout adds little or costs.
#
#   bash scripts/reproduce_dropout.sh                 # CIFAR-10 subset on CPU
#   FULL=1 DATA_ROOT=data bash scripts/reproduce_dropout.sh   # full CIFAR-10, VGG16, GPU
#   SMOKE=1 bash scripts/reproduce_dropout.sh
# Results: outputs/repro/dropout/{table.md,lr.png}; table in docs/reproductions.md
REPRO_NAME=dropout
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# The preset (configs/experiment/dropout.yaml) is norm x dropout 0/0.2/0.5 x seeds 0,1; on the
# subset 5 seeds are run (the 45 runs take ~5 minutes on 2 CPU cores): dropout's effect is
# within a point or two, so 2 seeds cannot separate it from seed noise.
# Subset: a small training set (1k images, 8 epochs) so the networks overfit within the CPU
# budget -- a gap is what dropout can close; 1k test images for the gap's test side.
# FULL: VGG16, whose two hidden linear layers are where the original VGG used dropout.
# lr 0.01 for every norm: the lr at which the cnn trains without BN (it diverges at
# lr 0.05 and above; see reproduce_lr_stability.sh), so that all variants
# share one learning rate and differ only in the norm.
sweep grid experiment=dropout \
    "model=$(pick cnn vgg16)" \
    norm=custom,torch,none \
    optim.lr=0.01 \
    model.dropout=0.0,0.2,0.5 \
    "seed=$(seeds 0,1,2,3,4 0,1,2)" \
    "epochs=$(pick 8 60)" \
    "data.train_size=$(pick 1000 null)" \
    "data.test_size=$(pick 1000 null)"

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"
