#!/usr/bin/env bash
# Hessian outliers with and without BN (Ghorbani, Krishnan & Xiao 2019, arXiv 1901.10159,
# Sec. 4, Figs. 2-4). Without BN, a few large isolated eigenvalues (outliers) appear in the
# Hessian spectrum early in training, and the gradient concentrates in their eigenspace
# (||P_k g||^2 / ||g||^2 close to 1 for the top-k eigenspace); with BN they are almost absent;
# they come back when BN normalizes with population statistics instead of the batch's own.
# Yao et al. 2020 (PyHessian, arXiv 1912.07145): BN's smoothing shows in deep nets, not in
# shallow ones -- hence two models, the 4-slot cnn and resnet20.
#
# This study trains custom BN and no norm (torch BN for seed 0 of the cnn, as the check of
# custom BN), keeps a checkpoint per epoch (epoch 0: the initial weights), and measures each
# kept epoch of MEASURE_EPOCHS with `bnlab curvature`: the top K eigenvalues (Lanczos), the
# eigenvalue density (stochastic Lanczos quadrature), the gradient overlap with the top-K
# eigenspace, on one fixed class-balanced training batch of HESS_BATCH images in eval mode;
# BN runs with batch, running and population statistics on the same checkpoints (running is
# left out at epoch 0, where the running statistics are still their initial 0 and 1).
# Both norms of a model train at the same learning rate, the one at which no norm trains
# (constant schedule, so the curvature is not confounded with a decaying lr).
#
#   THREADS=1 bash scripts/study_hessian.sh          # CIFAR-10 subset on CPU, seeds 0 and 1
#   SEEDS=0 THREADS=1 bash scripts/study_hessian.sh
#   FULL=1 DATA_ROOT=data bash scripts/study_hessian.sh
#   SMOKE=1 bash scripts/study_hessian.sh
#   ANALYZE_ONLY=1 bash scripts/study_hessian.sh     # tables and figures from what is on disk
# Resumable: a measurement whose curvature file exists is not redone. The order below puts
# what the verdicts need first (seed 0 of both models), so a run stopped early still answers.
# Results: outputs/repro/hessian/{table.md,study.md,*.png,train/<model>/<run>/curv/*.json};
# figures docs/figures/hessian.png, docs/figures/hessian_density.png
REPRO_NAME=hessian
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

EPOCHS=${EPOCHS:-$(pick 3 10 1)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick 4000 null)}
MEASURE_EPOCHS=${MEASURE_EPOCHS:-$(pick "0 1 3" "0 1 2 5 10" "0 1")}
MODELS=${MODELS:-$(pick "cnn resnet20" "resnet20 resnet32")}
# The measured batch and the Lanczos sizes (one Hessian-vector product costs about 2-4
# training steps of the same batch; docs/benchmarks.md). Trace: the minimum of 2 probes, the
# study does not use it.
HESS_BATCH=${HESS_BATCH:-$(pick 64 1024 32)}
K=${K:-10}
ITERS=${ITERS:-$(pick 30 100 12)}
STEPS=${STEPS:-$(pick 30 100 12)}
RUNS=${RUNS:-$(pick 1 3 1)}
POP_BATCHES=${POP_BATCHES:-$(pick 16 100 2)}
TORCH_MODEL=${TORCH_MODEL:-$(pick cnn resnet20)}  # torch BN is trained and measured on it

# model_args MODEL: the model and its learning rate. The cnn without BN trains at bnlab's
# default 0.01. resnet20 without BN (initial loss ~65: He init, identity shortcuts) diverges
# there at step 3, and at 0.003 its first steps kill it (loss ln 10, constant output, from
# step ~15 on); at 0.001 it trains.
model_args() {
    case $1 in
        cnn) echo "model=cnn optim.lr=0.01" ;;
        resnet20) echo "model=resnet20 optim.lr=0.001" ;;
        resnet32) echo "model=resnet model.depth=32 optim.lr=0.001" ;;
        *) echo "error: unknown model $1" >&2; return 1 ;;
    esac
}

for model in $MODELS; do
    read -r -a margs <<< "$(model_args "$model")"
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    sweep "train/$model" "seed=$(seeds 0,1 0,1,2)" norm=custom,none "${margs[@]}" \
        sched=constant "epochs=$EPOCHS" "data.train_size=$TRAIN_SIZE" probe=off \
        keep_epoch_checkpoints=true 'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
    [[ $model == "$TORCH_MODEL" ]] || continue
    # shellcheck disable=SC2016
    sweep "train/$model" seed=0 norm=torch "${margs[@]}" \
        sched=constant "epochs=$EPOCHS" "data.train_size=$TRAIN_SIZE" probe=off \
        keep_epoch_checkpoints=true 'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
done

# measure MODEL NORM SEED EPOCH MODE [NAME BATCH ITERS STEPS]: one `bnlab curvature` call into
# the run's curv/NAME_E_MODE.json (NAME: epoch; BATCH, ITERS, STEPS: the defaults above),
# skipped when that file exists (resume) or under ANALYZE_ONLY.
measure() {
    local run out name=${6:-epoch} batch=${7:-$HESS_BATCH} iters=${8:-$ITERS} steps=${9:-$STEPS}
    run=$(run_dir "train/$1" "norm=$2,seed=$3") || return 0
    out=$run/curv/${name}_$4_$5.json
    [[ -f $out || ${ANALYZE_ONLY:-0} == 1 ]] && return 0
    [[ -f $run/checkpoints/epoch_$(printf %03d "$4").pt ]] || {
        log "skip $out: epoch $4 not kept (run diverged or too few epochs)"
        return 0
    }
    mkdir -p "$run/curv"
    local start=$SECONDS
    bnlab curvature "$run" --epoch "$4" --bn "$5" --batch-size "$batch" --k "$K" \
        --iters "$iters" --samples 2 --steps "$steps" --runs "$RUNS" \
        --population-batches "$POP_BATCHES" --device "${DEVICE:-$(pick cpu cuda cpu)}" \
        ${THREADS:+--threads "$THREADS"} ${DATA_ROOT:+--data-root "$DATA_ROOT"} --out "$out" \
        2> "${out%.json}.log" || { log "FAILED: $out (see its .log)"; return 0; }
    log "measured $out in $((SECONDS - start)) s"
}

# measure_point MODEL NORM SEED EPOCH MODES...
measure_point() {
    local m=$1 n=$2 s=$3 e=$4 mode
    shift 4
    for mode in "$@"; do
        [[ $mode == running && $e == 0 ]] && continue  # initial running stats: 0 and 1
        measure "$m" "$n" "$s" "$e" "$mode"
    done
}

IFS=, read -r -a SEED_LIST <<< "$(seeds 0,1 0,1,2)"
# Seed 0: every measure; torch BN: batch and population statistics, as the check of custom.
for model in $MODELS; do
    for e in $MEASURE_EPOCHS; do
        measure_point "$model" none 0 "$e" batch
        measure_point "$model" custom 0 "$e" batch population running
    done
done
for e in $MEASURE_EPOCHS; do
    [[ $e == 0 || " $MODELS " != *" $TORCH_MODEL "* ]] && continue
    measure_point "$TORCH_MODEL" torch 0 "$e" batch population
done
# Further seeds: what the verdicts rest on (no norm; BN with batch and population statistics).
for s in "${SEED_LIST[@]:1}"; do
    for model in $MODELS; do
        for e in $MEASURE_EPOCHS; do
            [[ $e == 0 ]] && continue
            measure_point "$model" none "$s" "$e" batch
            measure_point "$model" custom "$s" "$e" batch population
        done
    done
done

# Sensitivity check: seed 0 of the first model at the last measured epoch, no norm and BN with
# batch and population statistics, on 4x the batch (curv/check_*): does the measured batch's
# size (the rank of its Hessian's Gauss-Newton part is at most batch x 9) move the verdicts?
LAST=${MEASURE_EPOCHS##* }
if [[ ${CHECK:-1} == 1 ]]; then
    for nm in none,batch custom,batch custom,population; do
        measure "${MODELS%% *}" "${nm%,*}" 0 "$LAST" "${nm#*,}" check $((4 * HESS_BATCH))
    done
fi

bnlab compare "$OUT_DIR"/train --format markdown --out "$OUT_DIR/table.md"
cat "$OUT_DIR/table.md"

# study.md: one row per (model, norm, bn, epoch), mean ± std over seeds, and the figure.
# Outlier measures (both from one measurement):
#   lambda_1 / lambda_K   the top eigenvalue against the K-th (Lanczos)
#   lambda_1 / edge       edge: the bulk edge from the density, the largest quadrature node
#                         that carries the weight of at least 10 eigenvalues (weight >= 10/dim,
#                         averaged over runs): above it, only isolated eigenvalues
python - "$OUT_DIR" "$K" <<'PY' | tee "$OUT_DIR/study.md"
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

out, k = Path(sys.argv[1]), int(sys.argv[2])
EDGE_EIGENVALUES = 10


def bulk_edge(r):
    edges = []
    for nodes, weights in zip(r["density"]["nodes"], r["density"]["weights"], strict=True):
        heavy = [t for t, w in zip(nodes, weights, strict=True) if w >= EDGE_EIGENVALUES / r["dim"]]
        edges.append(max(heavy))
    return statistics.fmean(edges)


rows = defaultdict(lambda: defaultdict(list))  # (model, norm, bn, epoch) -> measure -> seeds
checks = defaultdict(lambda: defaultdict(list))  # the same, of the sensitivity check
for f in sorted(out.glob("train/*/*/curv/*.json")):
    r = json.loads(f.read_text())
    run = f.parent.parent
    model, norm = run.parent.name, run.name.split(",")[0].split("=")[1]
    top = r["top_eigenvalues"]
    edge = bulk_edge(r)
    cell = (checks if f.name.startswith("check_") else rows)[(model, norm, r["bn"], r["epoch"])]
    cell["batch"].append(r["batch_size"])
    cell["iters"].append(r["settings"]["iters"])
    # lambda_1 / lambda_K only where lambda_K > 0: a K-th Ritz value <= 0 means that the
    # Lanczos steps did not resolve K positive eigenvalues (a broad spectrum, no gap)
    for name, v in (("loss", r["loss"]), ("lambda_1", top[0]), ("lambda_K", top[-1]),
                    ("l1/lK", top[0] / top[-1] if top[-1] > 0 else None), ("edge", edge), ("l1/edge", top[0] / edge),
                    ("overlap", r["gradient_overlap"]), ("gnorm", r["gradient_norm"]),
                    ("resid", max(r["residuals"]) / abs(top[0])), ("s", r["time_s"])):
        cell[name].append(v)
    cell["seed"].append(run.name.split("seed=")[1])


def fmt(values):
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    text = f"{statistics.fmean(v):.3g}"
    text += f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else ""
    return text + (f" ({len(v)})" if len(v) != len(values) else "")


cols = ["loss", "lambda_1", "lambda_K", "l1/lK", "edge", "l1/edge", "overlap", "resid"]
print(f"K = {k}. lambda_1 / lambda_K: top against K-th eigenvalue; edge: bulk edge of the "
      f"density (largest quadrature node of weight >= {EDGE_EIGENVALUES}/dim); overlap: "
      "||P_K g||^2/||g||^2; resid: largest Ritz residual of the top K / lambda_1. Mean ± std "
      "over seeds.\n")
print("| model | norm | bn | epoch | seeds | " + " | ".join(cols) + " |")
print("|---" * (len(cols) + 5) + "|")
order = {"none": 0, "custom": 1, "torch": 2}
modes = {"batch": 0, "running": 1, "population": 2}
for key in sorted(rows, key=lambda t: (t[0], order.get(t[1], 9), modes[t[2]], t[3])):
    cell = rows[key]
    print(f"| {' | '.join(map(str, key))} | {len(cell['seed'])} | "
          + " | ".join(fmt(cell[c]) for c in cols) + " |")
if checks:
    print("\nSensitivity check (seed 0): each point measured as above and on 4x the batch.\n")
    print("| model | norm | bn | epoch | batch | iters | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 6) + "|")
    for key in sorted(checks, key=lambda t: (t[0], order.get(t[1], 9), modes[t[2]], t[3])):
        for cell in (rows.get(key, {}), checks[key]):
            if "0" not in cell.get("seed", []):
                continue
            i = cell["seed"].index("0")
            print(f"| {' | '.join(map(str, key))} | {cell['batch'][i]} | {cell['iters'][i]} | "
                  + " | ".join(fmt([cell[c][i]]) for c in cols) + " |")

# Figure: per model (rows), lambda_1, lambda_1/edge and the overlap against the epoch; one
# curve per (norm, bn), mean over seeds with the seeds' range as error bars.
models = sorted({key[0] for key in rows})
if models:
    fig = Figure(figsize=(12, 3.4 * len(models)))
    axes = fig.subplots(len(models), 3, squeeze=False)
    style = {("none", "batch"): ("k", "-", "no norm"),
             ("custom", "batch"): ("C0", "-", "BN, batch stats"),
             ("custom", "running"): ("C2", ":", "BN, running stats"),
             ("custom", "population"): ("C3", "--", "BN, population stats"),
             ("torch", "batch"): ("C0", "", "torch BN, batch"),
             ("torch", "population"): ("C3", "", "torch BN, population")}
    for row, model in zip(axes, models):
        for (norm, bn), (color, line, label) in style.items():
            keys = sorted((key for key in rows if key[:3] == (model, norm, bn)),
                          key=lambda t: t[3])
            if not keys:
                continue
            ep = [key[3] for key in keys]
            for ax, name in zip(row, ("lambda_1", "l1/edge", "overlap")):
                vals = [rows[key][name] for key in keys]
                mean = np.array([statistics.fmean(v) for v in vals])
                err = np.array([[mean[i] - min(v), max(v) - mean[i]] for i, v in
                                enumerate(vals)]).T
                ax.errorbar(ep, mean, yerr=err, color=color, linestyle=line or "none",
                            marker="o" if norm != "torch" else "x", ms=5 if line else 9,
                            capsize=3, label=label)
        for ax, title in zip(row, ("λ_1 (top Hessian eigenvalue)",
                                   "λ_1 / bulk edge (outlier ratio)",
                                   f"gradient overlap ‖P_{k} g‖² / ‖g‖²")):
            ax.set_title(f"{model}: {title}", fontsize="medium")
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[2].set_ylim(0, 1)
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out / "hessian.png", dpi=70)
PY
if [[ -f $OUT_DIR/hessian.png ]]; then publish "$OUT_DIR/hessian.png" hessian; fi

# Densities at the last measured epoch of seed 0: no norm and BN with each statistics mode,
# one panel per model (`bnlab plot --curvature` overlays them).
for model in $MODELS; do
    files=()
    for nm in none,batch custom,batch custom,running custom,population; do
        run=$(run_dir "train/$model" "norm=${nm%,*},seed=0" 2> /dev/null) || continue
        f=$run/curv/epoch_${LAST}_${nm#*,}.json
        [[ -f $f ]] && files+=("$f")
    done
    if [[ ${#files[@]} -gt 0 ]]; then
        bnlab plot --curvature "${files[@]}" --out "$OUT_DIR/density_$model.png"
    fi
done
python - "$OUT_DIR" $MODELS <<'PY'
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.image import imread

out, models = Path(sys.argv[1]), sys.argv[2:]
panels = [out / f"density_{m}.png" for m in models if (out / f"density_{m}.png").exists()]
if panels:
    images = [imread(p) for p in panels]
    fig = Figure(figsize=(11, 4.5 * len(images)))
    for ax, image, path in zip(fig.subplots(len(images), 1, squeeze=False)[:, 0], images, panels):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(path.stem.removeprefix("density_"), fontsize="large")
    fig.tight_layout()
    fig.savefig(out / "hessian_density.png", dpi=60)
PY
if [[ -f $OUT_DIR/hessian_density.png ]]; then
    publish "$OUT_DIR/hessian_density.png" hessian_density
fi
