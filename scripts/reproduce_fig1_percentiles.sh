#!/usr/bin/env bash
# Ioffe & Szegedy 2015, Fig. 1(b, c): the 15th, 50th and 85th percentiles of the input to a
# deep layer's nonlinearity over training, without BN and with BN (bnlab's custom BN and
# torch's side by side). Expected: without BN the distribution drifts (its median and spread
# move); with BN it stays put. Custom and torch BN start from the same weights (same seed), so
# their panels should look alike.
#
#   bash scripts/reproduce_fig1_percentiles.sh        # CIFAR-10 subset on CPU
#   FULL=1 DATA_ROOT=data bash scripts/reproduce_fig1_percentiles.sh   # full CIFAR-10, VGG11, GPU
#   SMOKE=1 bash scripts/reproduce_fig1_percentiles.sh
# Results: outputs/repro/fig1_percentiles/{table.md,percentiles.png};
# figure docs/figures/fig1_percentiles.png
REPRO_NAME=fig1_percentiles
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

MODEL=$(pick cnn vgg11)
# The watched layers: a middle conv slot and the last hidden layer's slot. The paper's curve
# is a sigmoid input in the last hidden layer of an MLP; here the deepest slot (the hidden
# linear layer, classifier.1 in cnn, classifier.4 in vgg11) is its counterpart.
if [[ $MODEL == cnn ]]; then
    LAYERS=(features.9 classifier.1)
else
    LAYERS=(features.16 classifier.4)
fi
DEEP=${LAYERS[1]}

# Percentiles every few steps, so even the short subset run gives a curve (4k images x 4
# epochs = 125 steps); histograms every 10th probe for the snapshot rows. One seed: the figure
# is the result, and the custom and torch panels already show seed-free agreement.
# lr 0.01 for all three: without BN the cnn diverges at lr 0.05 (at step 2, like
# every lr >= 0.1 in reproduce_lr_stability.sh), and a diverged run has no distribution to show.
sweep runs \
    "model=$MODEL" \
    norm=custom,torch,none \
    optim.lr=0.01 \
    "seed=$(seeds 0 0)" \
    "epochs=$(pick 4 30)" \
    "data.train_size=$(pick 4000 null)" \
    "probe.act_every=$(pick 5 50 1)" \
    "probe.hist_every=$(pick 50 1000 2)" \
    "probe.layers=[$(IFS=,; echo "${LAYERS[*]}")]"

bnlab compare "$OUT_DIR/runs" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"
# Columns: custom BN, torch BN, no BN; rows: the percentile bands of each layer, gradient
# norm, drift and histogram snapshots.
bnlab plot "$(run_dir runs '*norm=custom*')" "$(run_dir runs '*norm=torch*')" \
    "$(run_dir runs '*norm=none*')" --layer "$DEEP" --out "$OUT_DIR/percentiles.png"
publish "$OUT_DIR/percentiles.png" fig1_percentiles
