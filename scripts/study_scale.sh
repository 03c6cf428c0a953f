#!/usr/bin/env bash
# Scale invariance: the angular update of scale-invariant weights and what weight decay does to
# them (van Laarhoven 2017, arXiv 1706.05350; Li & Arora 2020, arXiv 1910.07454; Wan et al.
# 2021, arXiv 2006.08419, "Spherical motion dynamics").
#   (a) A weight that feeds a batch-statistics norm (or standardizes itself: Scaled WS) is
#       scale-invariant; under SGD with heavy-ball momentum α, weight decay λ and a constant lr η
#       its angular update per step tends to sqrt(2ηλ/(1+α)) once its norm has settled. A weight
#       that is not scale-invariant (a norm-free net's) has no such equilibrium.
#   (b) In a BN net weight decay acts on the scale-invariant weights only through their
#       effective learning rate η/‖w‖²: λ = 0 with the lr schedule that keeps the effective lr
#       of the λ > 0 run (Li & Arora's exponentially growing lr) should train like the λ > 0 run,
#       λ = 0 at a constant lr should not; in a norm-free net weight decay is a regularizer.
#
# Runs: cnn, 6 epochs of all 10k training images (468 steps), constant lr, SGD momentum 0.9, the
# scale/ probe every SCALE_EVERY steps (everything else off):
#   bn       norm=custom at lr 0.1, λ = 5e-4 and 0 (seeds); norm=torch at 5e-4 (first seed, the
#            check of custom BN); λ = 2e-3 (first seed: does the angle follow sqrt(ηλ)?)
#   bn_exp   norm=custom at λ = 0 with the lr growing as Li & Arora's equivalence prescribes for
#            λ = 5e-4 (seeds) and 2e-3 (first seed) (sched=step with many small steps, see
#            exp_schedule below)
#   sws      norm=none model.weight_std=scaled (Scaled WS convs, the hidden linear layer plain) at
#            lr 0.1, λ = 5e-4 (seeds) and 0 (first seed)
#   none     norm=none at lr 0.01 (the cnn without a norm diverges at 0.1, section 1), λ = 5e-3
#            (the same ηλ as the BN runs, so the same predicted angle) and 0 (seeds)
#   none_exp norm=none at λ = 0 with the exponential lr of λ = 5e-3 (first seed): the
#            equivalence has nothing to act on in a net without scale-invariant weights
# The norm-free sweeps also measure the layers that are *not* scale-invariant (the scale/ tags
# of every slot layer: the control). bnlab's probe measures the scale-invariant ones only, so
# those sweeps run through all_slots_train below.
#
#   THREADS=1 bash scripts/study_scale.sh           # CIFAR-10 subset on CPU, seeds 0 and 1 (17 runs)
#   SEEDS=0 THREADS=1 bash scripts/study_scale.sh
#   THREADS=1 EPOCHS=10 bash scripts/study_scale.sh   # longer (own sweep dirs: train_e10/)
#   FULL=1 DATA_ROOT=data bash scripts/study_scale.sh   # GPU: full CIFAR-10, cnn and resnet20
#   SMOKE=1 bash scripts/study_scale.sh
#   ANALYZE_ONLY=1 bash scripts/study_scale.sh      # tables and figures from what is on disk
# Run it with the environment whose `bnlab` and `python` are the same install.
# Resumable (resume=true); seed 0 of every setting runs before seed 1, so a run stopped early
# still answers. Results: outputs/repro/scale/{table,study}<tag>.md, *.png, train<tag>/<sweep>/<run>
# (<tag>: the sizes that differ from the defaults, e.g. _e10); figures
# docs/figures/scale_angle<tag>.png, docs/figures/scale_wd<tag>.png. What it found and what a run
# costs here: docs/reproductions.md, section 15.
REPRO_NAME=scale
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

EPOCHS=${EPOCHS:-$(pick 6 30)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
MODELS=${MODELS:-$(pick cnn "cnn resnet20")}
SCALE_EVERY=${SCALE_EVERY:-$(pick 5 10 1)}
MOMENTUM=0.9
BN_LR=0.1
WD=5e-4
# 4x WD: the predicted angle doubles and the norm settles 4x sooner.
WD_BIG=2e-3
# The norm-free cnn trains at 0.01; its λ = BN_LR·WD / lr keeps ηλ, hence the predicted angle
# and the time scale, equal to the BN runs' (nf_weight_decay below, per model).
NF_LR=${NF_LR:-0.01}
# Steps the exponential schedules are computed for (batch 128, the last partial batch dropped):
# the smoke scale trains 1 epoch of 512 images.
TRAIN_IMAGES=$([[ $TRAIN_SIZE == null ]] && pick 10000 50000 512 || pick "$TRAIN_SIZE" "$TRAIN_SIZE" 512)
STEPS=$(( $(pick "$EPOCHS" "$EPOCHS" 1) * (TRAIN_IMAGES / 128) ))
# A run at other sizes than the defaults gets its own sweep dirs (train_e10/, ...), so that it
# never resumes into, or mixes with, the runs of another size.
TAG=""
[[ $TRAIN_SIZE != "$(pick null null)" ]] && TAG+="_n$TRAIN_SIZE"
[[ $EPOCHS != "$(pick 6 30)" ]] && TAG+="_e$EPOCHS"
TRAIN=train$TAG

PROBE=(probe.grad_every=0 probe.act_every=0 probe.hist_every=0 probe.white_every=0
       probe.bnstats_every=0 "probe.scale_every=$SCALE_EVERY")
COMMON=(sched=constant "epochs=$EPOCHS" "data.train_size=$TRAIN_SIZE" "optim.momentum=$MOMENTUM"
        "${PROBE[@]}")
# shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
SUBDIR='hydra.sweep.subdir="norm=${norm.name},wd=${optim.weight_decay},seed=${seed}"'

# model_args MODEL KIND: the model overrides of a kind of net (bn, sws, none) and its lr.
# resnet20 (FULL only, not run here): the norm-free ResNet is Brock et al.'s NF-ResNet
# (residual=nf with Scaled WS); without a norm at all it gets lr 0.001, an untested guess at a
# stable lr for it.
model_args() {
    case $1:$2 in
        cnn:bn) echo "model=cnn optim.lr=$BN_LR" ;;
        cnn:sws) echo "model=cnn model.weight_std=scaled norm=none optim.lr=$BN_LR" ;;
        cnn:none) echo "model=cnn norm=none optim.lr=$NF_LR" ;;
        resnet20:bn) echo "model=resnet20 optim.lr=$BN_LR" ;;
        resnet20:sws) echo "model=resnet20 model.residual=nf model.weight_std=scaled norm=none optim.lr=$BN_LR" ;;
        resnet20:none) echo "model=resnet20 norm=none optim.lr=0.001" ;;
        *) echo "error: unknown model/kind $1/$2" >&2; return 1 ;;
    esac
}

# all_slots_train ARGS...: `bnlab train ARGS` with the scale/ probe measuring every slot's layer
# (find_slots), not only the scale-invariant ones: the same measurement on weights the theory
# does not cover. A script-level substitution of bnlab.probes.scale.scale_invariant_layers
# (bnlab has no option for it); the training itself is bnlab's, unchanged.
all_slots_train() {
    python - "$@" <<'PY'
import sys

import bnlab.probes.scale as scale
from bnlab.cli import main
from bnlab.models import find_slots

scale.scale_invariant_layers = lambda model: [slot.layer for slot in find_slots(model)]
sys.argv = ["bnlab", "train", *sys.argv[1:]]
main()
PY
}
# sweep (repro_common.sh) calls `bnlab train`; ALL_SLOTS=1 sends it through all_slots_train.
bnlab() {
    if [[ ${ALL_SLOTS:-0} == 1 && $1 == train ]]; then
        shift
        all_slots_train "$@"
    else
        command bnlab "$@"
    fi
}

# exp_schedule LR WD: Li & Arora 2020 (Thm. 1.2): for scale-invariant weights, heavy-ball SGD
# with weight decay λ at lr η equals SGD without weight decay at lr η·r^(-2t), r the larger root
# of z² − (1 + α − ηλ) z + α = 0 (≈ 1 − ηλ/(1 − α)). bnlab has no exponential schedule; sched=step
# with SEGMENTS equal steps approximates it, each segment at the exponential's value at its
# middle. Prints the overrides.
exp_schedule() {
    python - "$1" "$2" "$MOMENTUM" "$STEPS" <<'PY'
import math
import sys

lr, wd, momentum, steps = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
b = 1 + momentum - lr * wd
r = (b + math.sqrt(b * b - 4 * momentum)) / 2
segments = max(2, steps // 15)
length = steps / segments
milestones = ",".join(f"{k / segments:.6g}" for k in range(1, segments))
print(f"sched=step sched.milestones=[{milestones}] sched.gamma={r ** (-2 * length):.9g} "
      f"optim.lr={lr * r ** (-length):.9g}")
PY
}

# nf_weight_decay MODEL: the λ of the norm-free net without Scaled WS, BN_LR·WD / its lr.
nf_weight_decay() {
    local lr
    lr=$(model_args "$1" none | sed -n 's/.*optim.lr=\([^ ]*\).*/\1/p')
    python -c "print(f'{$BN_LR * $WD / $lr:.3g}')"
}

# exp_subdir WD: the job dir name of an exponential-lr run, named by the λ it stands in for.
exp_subdir() {
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    printf 'hydra.sweep.subdir="norm=${norm.name},wd=exp%s,seed=${seed}"' "$1"
}

IFS=, read -r -a SEED_LIST <<< "$(seeds 0,1 0,1,2)"
for seed in "${SEED_LIST[@]}"; do
    first=$([[ $seed == "${SEED_LIST[0]}" ]] && echo 1 || echo 0)
    for model in $MODELS; do
        read -r -a bn <<< "$(model_args "$model" bn)"
        read -r -a sws <<< "$(model_args "$model" sws)"
        read -r -a none <<< "$(model_args "$model" none)"
        nf_lr=$(model_args "$model" none | sed -n 's/.*optim.lr=\([^ ]*\).*/\1/p')
        nf_wd=$(nf_weight_decay "$model")
        read -r -a expo <<< "$(exp_schedule "$BN_LR" "$WD")"
        sweep "$TRAIN/$model/bn" "seed=$seed" norm=custom "${bn[@]}" "optim.weight_decay=$WD,0" \
            "${COMMON[@]}" "$SUBDIR"
        sweep "$TRAIN/$model/bn_exp" "seed=$seed" norm=custom "${bn[@]}" optim.weight_decay=0 \
            "${COMMON[@]}" "${expo[@]}" "$(exp_subdir "$WD")"
        ALL_SLOTS=1 sweep "$TRAIN/$model/sws" "seed=$seed" "${sws[@]}" \
            "optim.weight_decay=$WD$([[ $first == 1 ]] && echo ,0)" "${COMMON[@]}" "$SUBDIR"
        ALL_SLOTS=1 sweep "$TRAIN/$model/none" "seed=$seed" "${none[@]}" \
            "optim.weight_decay=$nf_wd,0" "${COMMON[@]}" "$SUBDIR"
        [[ $first == 1 ]] || continue
        # The check of custom BN; a 4x larger weight decay (angle 2x, time scale 1/4) with its
        # exponential-lr twin; the exponential lr in the net without scale-invariant weights.
        sweep "$TRAIN/$model/bn" "seed=$seed" norm=torch "${bn[@]}" "optim.weight_decay=$WD" \
            "${COMMON[@]}" "$SUBDIR"
        sweep "$TRAIN/$model/bn" "seed=$seed" norm=custom "${bn[@]}" "optim.weight_decay=$WD_BIG" \
            "${COMMON[@]}" "$SUBDIR"
        read -r -a expo_big <<< "$(exp_schedule "$BN_LR" "$WD_BIG")"
        sweep "$TRAIN/$model/bn_exp" "seed=$seed" norm=custom "${bn[@]}" optim.weight_decay=0 \
            "${COMMON[@]}" "${expo_big[@]}" "$(exp_subdir "$WD_BIG")"
        read -r -a expo_nf <<< "$(exp_schedule "$nf_lr" "$nf_wd")"
        ALL_SLOTS=1 sweep "$TRAIN/$model/none_exp" "seed=$seed" "${none[@]}" \
            optim.weight_decay=0 "${COMMON[@]}" "${expo_nf[@]}" "$(exp_subdir "$nf_wd")"
    done
done

for model in $MODELS; do
    ROOT=$OUT_DIR/$TRAIN/$model
    [[ -d $ROOT ]] || { log "no runs under $ROOT"; continue; }
    # One compare table per sweep: compare does not tell the Scaled WS runs (norm=none) from the
    # plain norm-free ones.
    for s in bn bn_exp sws none none_exp; do
        [[ -d $ROOT/$s ]] || continue
        echo "### $s"
        echo
        bnlab compare "$ROOT/$s" --format markdown --out "$OUT_DIR/table${TAG}_${model}_$s.md" \
            --figure "$OUT_DIR/lr${TAG}_${model}_$s.png" >/dev/null
        cat "$OUT_DIR/table${TAG}_${model}_$s.md"
        echo
    done | tee "$OUT_DIR/table${TAG}_$model.md"
    python scripts/study_scale_analysis.py "$ROOT" "$OUT_DIR" "${TAG}_$model" "$MOMENTUM" \
        "$WD" "$WD_BIG" "$(nf_weight_decay "$model")" | tee "$OUT_DIR/study${TAG}_$model.md"
    suffix=$([[ $model == cnn ]] && echo "$TAG" || echo "${TAG}_$model")
    publish "$OUT_DIR/scale_angle${TAG}_$model.png" "scale_angle$suffix"
    publish "$OUT_DIR/scale_wd${TAG}_$model.png" "scale_wd$suffix"
done
