#!/usr/bin/env bash
# DBN, settled. Section 7 of docs/reproductions.md (study_whitening.sh) found decorrelated BN
# (Huang et al. 2018) about 4 points below BN on the cnn, with DBN in every slot, the hidden
# linear one included. The paper's own code (princeton-vl/DecorrelatedBN) never whitens a hidden
# linear layer: VGG-A has DBN after every conv and plain BN after its hidden linear layer
# (models/Conv/vggA_DBN.lua), the residual nets DBN after the first conv only ("DBN-L1",
# models/Conv/wr_DBN_scale_L1.lua). Three explanations of the gap are put to the test:
#   eval-time whitening  DBN evaluates with a running average of the batch whitening matrices,
#                        not the whitening of the population covariance: every DBN run is also
#                        evaluated with Precise BN (eval.precise_bn_batches), which re-estimates
#                        the mean and the whitening from the population covariance at fixed
#                        weights, after every epoch;
#   placement            DBN in the conv slots only (norm.slots=conv) and in the first slot only
#                        (norm.slots=first), plain (custom) BN in the others (norm.rest);
#   genuine              neither closes the gap: DBN is worse here.
# Group size 16 (the paper's and bnlab's default) against 8, 8 epochs with the cosine schedule
# (section 7: 4 epochs, constant lr), custom and torch BN as baselines at the same settings
# (they get Precise BN too: the same evaluation for every row).
#
#   THREADS=1 bash scripts/study_dbn.sh              # CIFAR-10 subset on CPU
#   THREADS=1 TRAIN_SIZE=5000 SEEDS=0,1 bash scripts/study_dbn.sh   # smaller (section 12)
#   THREADS=1 SCHED=constant EPOCHS=4 PLACEMENTS=all GROUP_SIZES=16 MINOR_SEEDS= \
#       bash scripts/study_dbn.sh                    # section 7's setting, with Precise BN
#   FULL=1 DATA_ROOT=data bash scripts/study_dbn.sh  # full CIFAR-10, VGG-A (vgg11), GPU
#   SMOKE=1 bash scripts/study_dbn.sh                # pipeline check, a few minutes
#   ANALYZE_ONLY=1 bash scripts/study_dbn.sh         # tables and figures from the runs on disk
# Results: outputs/repro/dbn/{table,study}<tag>.md, dbn<tag>.png (<tag>: the sizes that differ
# from the defaults, e.g. _n5000, _e4_constant); figure docs/figures/dbn<tag>.png
REPRO_NAME=dbn
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# Subset: all 10k training images, 8 epochs (624 steps at batch 128), the full 2k test set.
# FULL: VGG-A (bnlab's vgg11 is its layout), the net of the paper's CIFAR-10 placement
# experiment, 30 epochs. What one run costs here: docs/reproductions.md, section 12.
EPOCHS=${EPOCHS:-$(pick 8 30)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick null null)}
MODEL=$(pick cnn vgg11)
# lr 0.01 as in section 7, so that the schedule is the one change for the all-slots rows.
LR=${LR:-0.01}
# SCHED=constant EPOCHS=4 PLACEMENTS=all GROUP_SIZES=16 is section 7's setting (10k images,
# 4 epochs, constant lr) with Precise BN: where section 7 saw the gap.
SCHED=${SCHED:-cosine}
# Which DBN rows: placements (norm.slots) and group sizes, comma-separated.
PLACEMENTS=${PLACEMENTS:-all,conv,first}
GROUP_SIZES=${GROUP_SIZES:-16,8}
# SEEDS: the settings the verdict rests on (custom BN and DBN with group size 16 in each
# placement); MINOR_SEEDS: the others (torch BN, group size 8; MINOR_SEEDS= , set but empty:
# none). Seeds are the outer loop, so a run stopped early leaves every setting with the same
# seeds.
SEEDS=${SEEDS:-$(pick 0,1,2 0,1,2 0)}
MINOR_SEEDS=${MINOR_SEEDS-$(pick 0,1 0,1,2 0)}
# Precise BN from 2,560 training images (20 batches of 128) before every evaluation: per
# whitened group of 16 channels 2,560 x H x W samples in a conv slot and 2,560 in the hidden
# linear one (160 per dimension of its 16 x 16 covariance). Fewer than section 9's 6,400,
# because DBN's train-mode forwards are what the re-estimate costs and it runs every epoch.
PRECISE_IMAGES=${PRECISE_IMAGES:-$(pick 2560 12800 256)}
# Probes: gradient norms every 10 steps (compare's peak grad norm) and whiteness at every slot
# every 100 steps, which shows where the placement put the whitening.
PROBES=(probe.act_every=0 probe.hist_every=0 probe.bnstats_every=0
        "probe.grad_every=$(pick 10 10 1)" "probe.white_every=$(pick 100 500 2)")
COMMON=("model=$MODEL" "optim.lr=$LR" "sched=$SCHED" "epochs=$EPOCHS"
        "data.train_size=$TRAIN_SIZE" "eval.precise_bn_batches=$((PRECISE_IMAGES / 128))"
        "${PROBES[@]}")

# A run at other sizes than the defaults gets its own sweep dirs (bn_n5000/, dbn_g16_n5000/,
# ...), so that it never resumes into, or mixes with, the runs of another size.
TAG=""
[[ $TRAIN_SIZE != "$(pick null null)" ]] && TAG+="_n$TRAIN_SIZE"
[[ $EPOCHS != "$(pick 8 30)" ]] && TAG+="_e$EPOCHS"
[[ $LR != 0.01 ]] && TAG+="_lr$LR"
[[ $SCHED != cosine ]] && TAG+="_$SCHED"

in_list() {  # in_list X A,B,C: whether X is one of A, B, C
    [[ ,$2, == *,$1,* ]]
}

# Job dirs are named by the few keys that differ (hydra.sweep.subdir): all overrides would
# pass the 255-character file-name limit (docs/reproductions.md, "Problems met").
IFS=, read -r -a all_seeds <<< "$(echo "$SEEDS,$MINOR_SEEDS" | tr , '\n' | grep . | sort -un |
                                  paste -sd,)"
for seed in "${all_seeds[@]}"; do
    norms=()
    in_list "$seed" "$SEEDS" && norms+=(custom)
    in_list "$seed" "$MINOR_SEEDS" && norms+=(torch)
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    sweep "bn$TAG" "seed=$seed" "norm=$(IFS=,; echo "${norms[*]}")" "${COMMON[@]}" \
        'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
    IFS=, read -r -a group_sizes <<< "$GROUP_SIZES"
    for group in "${group_sizes[@]}"; do
        if [[ $group == 16 ]]; then group_seeds=$SEEDS; else group_seeds=$MINOR_SEEDS; fi
        in_list "$seed" "$group_seeds" || continue
        # shellcheck disable=SC2016
        sweep "dbn_g$group$TAG" "seed=$seed" norm=dbn "norm.slots=$PLACEMENTS" \
            "norm.group_size=$group" "${COMMON[@]}" \
            'hydra.sweep.subdir="slots=${norm.slots},seed=${seed}"'
    done
done

SWEEPS=() RUNS=()
for s in "$OUT_DIR/bn$TAG" "$OUT_DIR/dbn_g16$TAG" "$OUT_DIR/dbn_g8$TAG"; do
    if [[ -d $s ]]; then SWEEPS+=("$s") RUNS+=("$s"/*/); fi
done
bnlab compare "${SWEEPS[@]}" --format markdown --out "$OUT_DIR/table$TAG.md" \
    --figure "$OUT_DIR/lr$TAG.png"
cat "$OUT_DIR/table$TAG.md"

# After training, from each run's final checkpoint (batch_eval.json in the run dir): accuracy
# with each batch normalized by its own statistics (train mode, batches of the training batch
# size drawn at random, no augmentation; on a copy, so no running statistic moves) next to
# eval mode, on the test and on the training images. Train-mode test vs train-mode train
# accuracy is the generalization gap at fixed weights with the training-time normalization;
# eval-mode vs train-mode test accuracy is what evaluating with fixed statistics costs (for DBN:
# a whitening matrix instead of each batch's own). Eval mode re-done here must match
# metrics.json's final test accuracy, which checks that the model was rebuilt right.
python - "${THREADS:-1}" "${RUNS[@]}" <<'PY'
import copy
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bnlab import data as datasets
from bnlab.evaluation import evaluate
from bnlab.runtime import memory_format, pick_device
from bnlab.train import build

torch.set_num_threads(int(sys.argv[1]))


@torch.no_grad()
def batch_stat_acc(model, images, labels, mean, std, batch, fmt):
    """Accuracy in train mode (each batch normalized by its own statistics) over random full
    batches of ``batch`` images, on a copy of ``model``."""
    twin = copy.deepcopy(model).train()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    correct = seen = 0
    for i in range(len(labels) // batch):
        idx = order[i * batch:(i + 1) * batch]
        x = datasets.normalize(images[idx], mean, std).contiguous(memory_format=fmt)
        correct += int((twin(x).argmax(1) == labels[idx]).sum())
        seen += len(idx)
    return correct / seen


for run in map(Path, sys.argv[2:]):
    out, metrics = run / "batch_eval.json", run / "metrics.json"
    if not metrics.exists() or json.loads(metrics.read_text()).get("status") != "completed":
        continue
    if out.exists() and out.stat().st_mtime > metrics.stat().st_mtime:
        continue
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    device = pick_device(cfg.device)
    fmt = memory_format(cfg, device)
    data = datasets.load(cfg.data, device, cfg.seed)
    model = build(cfg, device, fmt)
    model.load_state_dict(torch.load(run / "checkpoint.pt", map_location=device,
                                     weights_only=True)["model"])
    model.eval()
    eval_test = evaluate(model, model, data, cfg, fmt)[1]
    train_only = datasets.Dataset(data.train, data.train, data.mean, data.std)
    result = {
        "test_acc_eval": eval_test,
        "test_acc_batch": batch_stat_acc(model, data.test.images, data.test.labels, data.mean,
                                         data.std, cfg.batch_size, fmt),
        "train_acc_eval": evaluate(model, model, train_only, cfg, fmt)[1],
        "train_acc_batch": batch_stat_acc(model, data.train.images, data.train.labels,
                                          data.mean, data.std, cfg.batch_size, fmt),
        "metrics_final_test_acc": json.loads(metrics.read_text())["final_test_acc"],
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"{run}: {result}", file=sys.stderr)
PY

# Per setting, mean ± std over seeds: test accuracy % with the running statistics (EMA) and
# with Precise BN after the first, middle and last epoch, the Precise-BN gain at the end, the
# training accuracy of the last epoch (train mode, augmented batches, as the weights moved) and
# the train-test gaps with either evaluation.
E=$(pick "$EPOCHS" "$EPOCHS" 1)
MID=$(( (E + 1) / 2 ))
COLS=("ep 1 EMA=h:test_acc@1" "ep 1 precise=h:test_acc_precise_bn@1"
      "ep $MID EMA=h:test_acc@$MID" "ep $MID precise=h:test_acc_precise_bn@$MID"
      "ep $E EMA=h:test_acc@$E" "ep $E precise=h:test_acc_precise_bn@$E"
      "precise gain=d:5-4" "train acc=h:train_acc@$E"
      "gap EMA=d:7-4" "gap precise=d:7-5")
if [[ $MODEL == cnn ]]; then
    SLOT_OUTS=(features.1 features.5 features.9 classifier.1)
else
    SLOT_OUTS=()  # vgg11: compare's deepest-layer whiteness only
fi
{
    echo "Test accuracy % with the running statistics (EMA) and with Precise BN, the Precise-BN gain and the train-test gaps (points) at the end:"
    echo
    study_table "${RUNS[@]}" -- "${COLS[@]}"
    echo
    echo "At the final weights (batch_eval.json): accuracy % in eval mode (running statistics) and with each batch normalized by its own statistics (train mode), on the test and the (un-augmented) training images; the generalization gap at fixed weights (train - test, train mode) and what eval mode costs on the test images (train mode - eval mode):"
    echo
    study_table "${RUNS[@]}" -- "test eval=f:batch_eval.json:test_acc_eval" \
        "test batch-stat=f:batch_eval.json:test_acc_batch" \
        "train eval=f:batch_eval.json:train_acc_eval" \
        "train batch-stat=f:batch_eval.json:train_acc_batch" \
        "generalization gap=d:3-1" "eval-mode cost=d:1-0"
    if ((${#SLOT_OUTS[@]})); then
        echo
        echo "Whiteness (mean |off-diagonal channel correlation|) at each slot output, last probe:"
        echo
        cols=()
        for l in "${SLOT_OUTS[@]}"; do cols+=("$l=e:white/offdiag_corr/$l:last"); done
        study_table "${RUNS[@]}" -- "${cols[@]}"
    fi
} | tee "$OUT_DIR/study$TAG.md"

# Paired by seed (a seed fixes the initial conv/linear weights and the batch order for every
# norm): final test accuracy minus custom BN's at the same seed, EMA and Precise BN (appended to
# study<tag>.md). Figure: left, test accuracy after each epoch, EMA (solid) and Precise BN (dashed),
# mean over seeds, custom BN and DBN-16 in each placement; right, final test accuracy of every
# setting, each seed a dot, EMA and Precise BN side by side.
python - "$OUT_DIR" "$TAG" <<'PY' | tee -a "$OUT_DIR/study$TAG.md"
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

out, tag = Path(sys.argv[1]), sys.argv[2]
runs = defaultdict(list)  # setting label -> [(EMA per epoch, Precise BN per epoch)]
final = defaultdict(dict)  # setting label -> seed -> (final EMA, final Precise BN)
for m in sorted(p for sweep in ("bn", "dbn_g16", "dbn_g8")
                for p in out.glob(f"{sweep}{tag}/*/metrics.json")):
    metrics = json.loads(m.read_text())
    if metrics.get("status") != "completed":
        continue
    norm = metrics["config"]["norm"]
    label = norm if norm in ("custom", "torch") else \
        f"dbn-{m.parent.parent.name.removeprefix('dbn_g').removesuffix(tag)} " \
        f"{m.parent.name.split(',')[0].removeprefix('slots=')}"
    hist = metrics["history"]
    runs[label].append((100 * np.array([h["test_acc"] for h in hist]),
                        100 * np.array([h.get("test_acc_precise_bn", np.nan) for h in hist])))
    final[label][metrics["config"]["seed"]] = (runs[label][-1][0][-1], runs[label][-1][1][-1])
order = [k for k in ("custom", "torch", "dbn-16 all", "dbn-16 conv", "dbn-16 first",
                     "dbn-8 all", "dbn-8 conv", "dbn-8 first") if k in runs]


def paired(label, col):
    diffs = [final[label][s][col] - final["custom"][s][col]
             for s in sorted(final[label]) if s in final.get("custom", {})]
    if not diffs:
        return "–"
    text = f"{statistics.fmean(diffs):+.1f}"
    return text + (f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else "") + \
        f" ({len(diffs)})"


print()
print("Paired by seed: final test accuracy % per seed (EMA / Precise BN), and the difference to "
      "custom BN at the same seed, mean ± std (seeds):")
print()
seeds = sorted({s for by_seed in final.values() for s in by_seed})
print("| setting | " + " | ".join(f"seed {s}" for s in seeds) + " | − custom, EMA | − custom, Precise BN |")
print("|---" * (len(seeds) + 3) + "|")
for label in order:
    cells = [f"{final[label][s][0]:.1f} / {final[label][s][1]:.1f}" if s in final[label] else "–"
             for s in seeds]
    print(f"| {label} | " + " | ".join(cells) + f" | {paired(label, 0)} | {paired(label, 1)} |")

fig = Figure(figsize=(11, 4))
left, right = fig.subplots(1, 2)
for i, label in enumerate(k for k in order if k == "custom" or k.startswith("dbn-16")):
    n = min(len(e) for e, _ in runs[label])
    ema = np.array([e[:n] for e, _ in runs[label]])
    pre = np.array([p[:n] for _, p in runs[label]])
    ep = np.arange(1, n + 1)
    left.plot(ep, ema.mean(0), color=f"C{i}", marker="o", label=f"{label} EMA")
    left.plot(ep, pre.mean(0), color=f"C{i}", marker="s", linestyle="--",
              label=f"{label} Precise BN")
left.set_xlabel("epoch")
left.set_ylabel("test accuracy % (mean over seeds)")
left.grid(True, alpha=0.3)
left.legend(fontsize="x-small")
for x, label in enumerate(order):
    for j, (name, col) in enumerate((("EMA", 0), ("Precise BN", 1))):
        finals = [r[col][-1] for r in runs[label]]
        right.scatter(np.full(len(finals), x + 0.18 * (2 * j - 1)), finals, s=14,
                      color=f"C{j}", label=name if x == 0 else None)
        right.hlines(np.mean(finals), x + 0.18 * (2 * j - 1) - 0.12,
                     x + 0.18 * (2 * j - 1) + 0.12, color=f"C{j}")
right.set_xticks(range(len(order)), order, rotation=30, fontsize="small")
right.set_ylabel("final test accuracy % (dots: seeds, bar: mean)")
right.grid(True, axis="y", alpha=0.3)
right.legend(fontsize="small")
fig.suptitle("DBN placement, group size and eval-time whitening (EMA vs Precise BN)")
fig.tight_layout()
fig.savefig(out / f"dbn{tag}.png", dpi=80)
PY
publish "$OUT_DIR/dbn$TAG.png" "dbn$TAG"
