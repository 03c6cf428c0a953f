#!/usr/bin/env bash
# Gradient-based internal covariate shift (Santurkar et al. 2018, Def. 2.1, Fig. 3): for each
# layer, how much its gradient changes when only the layers before it take their update:
# ||G - G'|| (0 = no shift) and cos(G, G') (1 = no shift). Expected (the paper's finding): BN
# does not reduce this ICS -- with BN it is about the same or larger than without.
#
#   bash scripts/reproduce_ics.sh                     # CIFAR-10 subset on CPU
#   FULL=1 DATA_ROOT=data bash scripts/reproduce_ics.sh   # full CIFAR-10, VGG16, GPU
#   SMOKE=1 bash scripts/reproduce_ics.sh
# Results: outputs/repro/ics/{table.md,ics.png,ics_deep.png}; figures docs/figures/ics*.png
REPRO_NAME=ics
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

MODEL=$(pick cnn vgg16)
if [[ $MODEL == cnn ]]; then DEEP=classifier.0; else DEEP=classifier.3; fi

# ICS costs one extra forward/backward per watched layer at each measurement, so it is taken
# every few steps and the activation probes are off. ICS tags use the layer feeding each slot
# (features.0, ..., classifier.0).
# lr 0.01 for every norm: the lr at which the cnn trains without BN (it diverges at
# lr 0.05 and above; see reproduce_lr_stability.sh), so that all variants
# share one learning rate and differ only in the norm. A constant lr: under the default
# cosine schedule the lr -> 0 at the end, where every update (hence ICS) vanishes, and the
# landscape would be probed at points the optimizer no longer moves between.
sweep grid \
    "model=$MODEL" \
    norm=custom,torch,none \
    optim.lr=0.01 \
    sched=constant \
    "seed=$(seeds 0 0,1)" \
    "epochs=$(pick 3 10)" \
    "data.train_size=$(pick 2000 null)" \
    "probe.ics_every=$(pick 5 100 2)" \
    probe.act_every=0 probe.hist_every=0

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"
RUNS=("$(run_dir grid '*norm=custom,*seed=0')" "$(run_dir grid '*norm=torch,*seed=0')"
      "$(run_dir grid '*norm=none,*seed=0')")
# Every layer's ICS, one column per norm (bnlab plot), and the deepest layer's with the norms
# overlaid on shared axes, as Santurkar et al. draw it.
bnlab plot "${RUNS[@]}" --out "$OUT_DIR/ics.png"
scalar_figure "$OUT_DIR/ics_deep.png" "Gradient ICS of $DEEP (Santurkar et al. Def. 2.1)" \
    "ics/l2/$DEEP,ics/cos/$DEEP" "$OUT_DIR"/grid/*/ | tee "$OUT_DIR/ics_deep.md"
publish "$OUT_DIR/ics.png" ics
publish "$OUT_DIR/ics_deep.png" ics_deep
