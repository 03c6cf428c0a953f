#!/usr/bin/env bash
# Does decorrelation reduce internal covariate shift? Huang et al. 2018 (Decorrelated BN) argue
# that whitening the activations, not only standardizing them, conditions the optimization
# better, so DBN trains faster and reaches higher accuracy than BN; IterNorm (Huang et al. 2019)
# whitens approximately. This study trains norm in {none, custom, torch, dbn, iternorm, group}
# from the same seeds and measures, per norm: how white the activations are (white/), the Ioffe
# drift of the activation distributions (drift/), Santurkar's gradient ICS (ics/), final test
# accuracy and convergence speed (test accuracy after each epoch, metrics.json history). The
# question it answers: does more whitening come with less ICS, faster convergence or higher
# accuracy?
#
#   bash scripts/study_whitening.sh                  # CIFAR-10 subset on CPU, 3 seeds
#   SEEDS=0,1 EPOCHS=3 TRAIN_SIZE=2000 bash scripts/study_whitening.sh   # a smaller, shared CPU
#   FULL=1 DATA_ROOT=data bash scripts/study_whitening.sh   # full CIFAR-10, GPU
#   SMOKE=1 bash scripts/study_whitening.sh          # pipeline check, seconds
# Results: outputs/repro/whitening/{table.md,study.md,*.png}; figures
# docs/figures/whitening_*.png
REPRO_NAME=whitening
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# Subset defaults: all 10k training images and 8 epochs (624 steps), the full 2k test set,
# 3 seeds -- enough to get past the first-epoch regime and to call a difference of a few
# points. DBN and IterNorm epochs take about 2x BN's; with THREADS=1 the default costs about
# 45 min (4 epochs x 3 seeds took 23 min on the shared 2-core CPU); EPOCHS=, TRAIN_SIZE=,
# SEEDS= shrink it (docs/reproductions.md says what was run).
EPOCHS=${EPOCHS:-$(pick 8 30)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
# Probe intervals in steps: the subset default gives ~30 whiteness/drift points and ~15 ICS
# points per run. ICS costs one extra forward/backward per watched layer, so it is sparser.
ACT_EVERY=${ACT_EVERY:-$(pick 20 200 2)}
ICS_EVERY=${ICS_EVERY:-$(pick 40 400 2)}

# One lr for every norm: 0.01, the lr at which the cnn trains without a norm (no BN diverges
# at 0.1, docs/reproductions.md section 1), so the norms differ in nothing else. Constant lr:
# ICS and drift scale with the update, and a cosine decay would shrink both towards the end
# for every norm alike, hiding differences (section 5). Group Norm has no batch statistics
# and serves as the "normalized, not whitened, batch-independent" control.
# dbn/iternorm: whitening in groups of 16 channels (configs/norm/dbn.yaml), as Huang et al.
# recommend (full whitening of wide layers is unstable and slow).
# Seeds first: Hydra runs the grid seed by seed, so a sweep stopped early leaves every norm
# with the same seeds (job dirs are named by sorted overrides, so the order changes no name).
sweep grid \
    "seed=$(seeds 0,1,2 0,1,2)" \
    "model=$(pick cnn vgg11)" \
    norm=none,custom,torch,dbn,iternorm,group \
    optim.lr=0.01 \
    sched=constant \
    "epochs=$EPOCHS" \
    "data.train_size=$TRAIN_SIZE" \
    "probe.act_every=$ACT_EVERY" \
    "probe.white_every=$ACT_EVERY" \
    "probe.ics_every=$ICS_EVERY" \
    probe.hist_every=0 probe.bnstats_every=0

bnlab compare "$OUT_DIR/grid" --format markdown --out "$OUT_DIR/table.md" \
    --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"

# The numbers compare does not (yet) have, mean over the run's probes: whiteness (mean
# |off-diagonal correlation| between channels and the effective-rank fraction; the condition
# number is left out, a singular covariance reads 1e12) and drift at the slot outputs (the
# tensors the norm produced, the ReLU inputs: what DBN whitens); gradient ICS at the layers
# feeding slots 2-4 (the first one has no layer before it, its ICS is 0 by definition); and
# test accuracy after each epoch (convergence speed). A per-channel affine map leaves
# correlations unchanged, so for BN and no norm the slot input reads the same as its output.
if [[ $(pick cnn vgg11) == cnn ]]; then
    OUTS=(features.1 features.5 features.9 classifier.1)
    ICS_LAYERS=(features.4 features.8 classifier.0)
else
    OUTS=("") ICS_LAYERS=("")  # every watched layer
fi
alts() {  # alts PREFIX LAYER...: PREFIX+LAYER1|PREFIX+LAYER2|...
    local prefix=$1 out=""
    shift
    for l in "$@"; do out+="${out:+|}$prefix$l"; done
    echo "$out"
}
COLS=("offdiag corr=e:$(alts white/offdiag_corr/ "${OUTS[@]}")"
      "erank frac=e:$(alts white/erank_frac/ "${OUTS[@]}")"
      "drift W1=e:$(alts drift/w1/ "${OUTS[@]}")"
      "ICS l2=e:$(alts ics/l2/ "${ICS_LAYERS[@]}")"
      "ICS cos=e:$(alts ics/cos/ "${ICS_LAYERS[@]}")")
for ((e = 1; e <= $(pick "$EPOCHS" "$EPOCHS" 1); e++)); do COLS+=("acc ep $e=h:test_acc@$e"); done
{
    echo "Mean over probes (whiteness, drift: slot outputs; ICS: layers feeding slots 2-4); test accuracy % after each epoch:"
    echo
    study_table "$OUT_DIR"/grid/*/ -- "${COLS[@]}"
    echo
    echo "Whiteness at the last probe, per slot output (mean |off-diagonal correlation|):"
    echo
    cols=()
    for l in "${OUTS[@]}"; do cols+=("$l=e:white/offdiag_corr/$l:last"); done
    study_table "$OUT_DIR"/grid/*/ -- "${cols[@]}"
} | tee "$OUT_DIR/study.md"

# Figures: whiteness, drift and ICS of the hidden linear slot (classifier.0 feeds it,
# classifier.1 is its output) over training, norms overlaid, seed 0; bnlab plot's per-run
# panels (percentiles, gradient norms, drift, ICS) for BN, DBN and no norm, seed 0 (kept in
# $OUT_DIR, not published); and test accuracy per epoch.
scalar_figure "$OUT_DIR/whitening_deep.png" "Whiteness, drift and ICS at the hidden linear slot" \
    "white/offdiag_corr/classifier.1,drift/w1/classifier.1,ics/l2/classifier.0" \
    "$OUT_DIR"/grid/*seed=0*/ | tee "$OUT_DIR/whitening_deep.md"
bnlab plot "$(run_dir grid '*norm=custom,*seed=0')" "$(run_dir grid '*norm=dbn,*seed=0')" \
    "$(run_dir grid '*norm=none,*seed=0')" --out "$OUT_DIR/whitening_plot.png"
python - "$OUT_DIR" <<'PY'
# Test accuracy per epoch, mean over seeds, one line per norm: convergence speed.
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

out = Path(sys.argv[1])
curves = defaultdict(list)
for m in sorted(out.glob("grid/*/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") != "completed":
        continue
    curves[metrics["config"]["norm"]].append([h["test_acc"] for h in metrics["history"]])
fig = Figure(figsize=(5.5, 3.8))
ax = fig.subplots()
for i, (norm, runs) in enumerate(sorted(curves.items())):
    n = min(len(r) for r in runs)
    acc = 100 * np.array([r[:n] for r in runs])
    ax.errorbar(np.arange(1, n + 1), acc.mean(0), yerr=acc.std(0) if len(runs) > 1 else None,
                color=f"C{i}", marker="o", capsize=2,
                linewidth=3 if norm == "custom" else 1.3, label=f"{norm} ({len(runs)} seeds)")
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy %")
ax.grid(True, alpha=0.3)
ax.legend(fontsize="small")
ax.set_title("Convergence: test accuracy after each epoch (mean ± std)")
fig.tight_layout()
fig.savefig(out / "whitening_convergence.png", dpi=80)
PY
publish "$OUT_DIR/whitening_deep.png" whitening_deep
publish "$OUT_DIR/whitening_convergence.png" whitening_convergence
