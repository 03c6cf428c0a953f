#!/usr/bin/env bash
# Depth at init and residual branches (issue 27, studies 2 and 3; docs/reproductions.md,
# sections 13 and 14).
#
# Study 2, signal at init (`bnlab signal`, no training):
#   Yang et al. 2019 (A mean field theory of batch normalization, ICLR): in a plain (no skip)
#   BN-ReLU net the gradient explodes at init, ‖∂L/∂W_l‖ growing geometrically toward the
#   input at a rate the mean-field theory gives (ReLU, large batch: √(π/(π−1)) ≈ 1.21 per layer
#   in the gradient norm, the square root of their λ = π/(π−1) for its square), whatever the
#   init; Daneshmand et al. 2020 (BN provably avoids rank collapse, NeurIPS): without a norm
#   the samples' representations collapse with depth (Gram rank → 1, similarity → 1), with BN
#   they keep a rank that does not fall with depth.
#   Grid: model=plain at PLAIN_DEPTHS and model=resnet at RESNET_DEPTHS, each with no norm,
#   custom and torch BN, Layer, Group, FRN, EvoNorm B0 and S0, and Scaled WS without a norm.
# Study 3a, branch/skip variance at init (SPPs, Brock et al. 2021 Fig. 1; De & Smith 2020):
#   in a BN ResNet the residual branch's variance over the skip's falls with depth like 1/ℓ
#   within a stage (the skip accumulates), which is what makes the net near-identity at init;
#   SkipInit (branch × 0), Fixup (last branch layer 0) and NF (x + α·f(x/β)) reach that
#   without a norm. Grid: model=resnet at RESNET_DEPTHS, residual standard (BN, none),
#   skipinit, fixup, nf (Scaled WS).
# Study 3b, training (bnlab train): model=resnet at TRAIN_DEPTHS with BN (custom; torch at
#   the first seed and depth), no norm, SkipInit, Fixup and NF, all at BN's learning rate 0.1
#   (cosine): which diverge, which train?
#
#   THREADS=1 bash scripts/study_depth.sh                 # CIFAR-10 subset on CPU
#   THREADS=1 PART=signal bash scripts/study_depth.sh     # study 2 and 3a only (PART=train: 3b)
#   THREADS=1 TRAIN_DEPTHS=56 SEEDS=0 bash scripts/study_depth.sh   # smaller
#   FULL=1 DATA_ROOT=data bash scripts/study_depth.sh     # full CIFAR-10, GPU
#   SMOKE=1 bash scripts/study_depth.sh                   # pipeline check
#   ANALYZE_ONLY=1 bash scripts/study_depth.sh            # tables and figures from the runs on disk
# Resumable: a signal sweep is redone only if it did not finish (a marker per sweep command);
# training sweeps run with resume=true. Seeds are the outer loop of training, so a run stopped
# early leaves every setting with the same seeds.
# Results: outputs/repro/depth/{signal_*.md,train*.md,*.png}; figures docs/figures/depth_*.png
# and docs/figures/residual_*.png
REPRO_NAME=depth
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

PART=${PART:-all}  # all | signal | train
PLAIN_DEPTHS=${PLAIN_DEPTHS:-$(pick 8,16,32,64 8,16,32,64,128 4,8)}
RESNET_DEPTHS=${RESNET_DEPTHS:-$(pick 20,32,56,110 20,56,110,218 8,14)}
SIGNAL_SEEDS=${SIGNAL_SEEDS:-$(pick 2 8 1)}
SIGNAL_BATCHES=${SIGNAL_BATCHES:-$(pick 2 4 1)}
NORMS=${NORMS:-none,custom,torch,layer,group,frn,evonorm_b0,evonorm_s0}
TRAIN_DEPTHS=${TRAIN_DEPTHS:-$(pick "56 110" "56 110" "8")}
EPOCHS=${EPOCHS:-$(pick 3 30 1)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick 2000 null)}
TEST_SIZE=${TEST_SIZE:-$(pick 1000 null)}
SEEDS=${SEEDS:-$(pick 0,1,2 0,1,2 0)}
LR=${LR:-0.1}  # BN's learning rate (He et al. 2016), for every residual scheme

# signal_sweep SUBDIR OVERRIDE...: one `bnlab signal -m` sweep into $OUT_DIR/SUBDIR, skipped
# when this very command finished before (its marker file); several commands may share a dir.
# A command interrupted halfway is redone whole (overwrite=true): signal sweeps are short.
signal_sweep() {
    local subdir=$1
    shift
    local marker
    marker="$OUT_DIR/$subdir/.done_$(echo "${DATA_ARGS[*]} $SIGNAL_SEEDS $SIGNAL_BATCHES $*" |
                                      md5sum | cut -c1-12)"
    if [[ ${ANALYZE_ONLY:-0} == 1 || -e $marker ]]; then
        log "signal $subdir: skipped ($*)"
        return 0
    fi
    log "signal $subdir: $*"
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    local name='depth=${model.depth},residual=${oc.select:model.residual,none}'
    name+=',norm=${norm.name},ws=${model.weight_std}'
    bnlab signal -m "${DATA_ARGS[@]}" "${DEVICE_ARGS[@]}" overwrite=true \
        "signal.seeds=$SIGNAL_SEEDS" "signal.batches=$SIGNAL_BATCHES" \
        "hydra.sweep.dir=$OUT_DIR/$subdir" "$@" \
        "hydra.sweep.subdir=\"$name\""
    touch "$marker"
}

if [[ $PART != train ]]; then
    # Study 2: plain nets, then resnets (standard residual), every norm; Scaled WS, no norm.
    signal_sweep plain model=plain "model.depth=$PLAIN_DEPTHS" "norm=$NORMS"
    signal_sweep plain model=plain "model.depth=$PLAIN_DEPTHS" norm=none model.weight_std=scaled
    signal_sweep resnet model=resnet "model.depth=$RESNET_DEPTHS" "norm=$NORMS"
    signal_sweep resnet model=resnet "model.depth=$RESNET_DEPTHS" norm=none \
        model.weight_std=scaled
    # Study 3a: the residual schemes without a norm (standard + BN / none are in resnet/).
    signal_sweep residual model=resnet "model.depth=$RESNET_DEPTHS" norm=none \
        model.residual=skipinit,fixup
    signal_sweep residual model=resnet "model.depth=$RESNET_DEPTHS" norm=none \
        model.residual=nf model.weight_std=scaled
fi

if [[ $PART != signal ]]; then
    COMMON=(model=resnet "optim.lr=$LR" "epochs=$EPOCHS" "data.train_size=$TRAIN_SIZE"
            "data.test_size=$TEST_SIZE" probe=off)
    IFS=, read -r -a seed_list <<< "$SEEDS"
    read -r -a depth_list <<< "$TRAIN_DEPTHS"
    for seed in "${seed_list[@]}"; do
        for depth in "${depth_list[@]}"; do
            # torch BN, the check of custom BN, at the first seed and depth only
            norms=custom
            [[ $seed == "${seed_list[0]}" && $depth == "${depth_list[0]}" ]] && norms=custom,torch
            # shellcheck disable=SC2016
            sub='hydra.sweep.subdir="residual=${model.residual},norm=${norm.name},'
            sub+='ws=${model.weight_std},seed=${seed}"'
            sweep "train_d$depth" "seed=$seed" "${COMMON[@]}" "model.depth=$depth" \
                "norm=$norms" "$sub"
            sweep "train_d$depth" "seed=$seed" "${COMMON[@]}" "model.depth=$depth" norm=none \
                model.residual=standard,skipinit,fixup "$sub"
            sweep "train_d$depth" "seed=$seed" "${COMMON[@]}" "model.depth=$depth" norm=none \
                model.residual=nf model.weight_std=scaled "$sub"
        done
    done
fi

# ---- analysis: what is on disk ----
for s in plain resnet residual; do
    [[ -d $OUT_DIR/$s ]] || continue
    bnlab compare "$OUT_DIR/$s" --format markdown --out "$OUT_DIR/signal_$s.md" \
        --figure "$OUT_DIR/compare_signal_$s.png" || log "compare $s failed"
done

# Per-setting numbers from signal.json (mean ± std over seeds × batches), and the figures:
# gradient growth per layer and first/last gradient ratio against depth (Yang et al.'s
# √(π/(π−1)) as a line), similarity / stable rank / effective rank at the deepest slot input
# against depth, and the last block's branch/skip variance ratio against √depth.
python - "$OUT_DIR" "$FIG_DIR" "$FIG_SUFFIX" <<'PY'
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

out, fig_dir, suffix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
YANG = math.sqrt(math.pi / (math.pi - 1))


def label_of(cfg):
    norm, ws, res = cfg["norm"], cfg.get("weight_std", "none"), cfg.get("residual")
    name = norm if ws == "none" else f"{norm}+{ws}WS"
    if res and res != "standard":
        name = res + (f"+{ws}WS" if ws != "none" else "") + (f" {norm}" if norm != "none" else "")
    return name


data = {}  # sweep -> label -> depth -> signal.json
for sweep in ("plain", "resnet", "residual"):
    for f in sorted((out / sweep).glob("*/signal.json")):
        d = json.loads(f.read_text())
        if d.get("status") != "completed":
            continue
        cfg = d["config"]
        data.setdefault(sweep, defaultdict(dict))[label_of(cfg)][int(cfg["depth"])] = d


def fmt(stat, digits=3):
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.{digits}g}"
    return text + (f" ± {stat['std']:.2g}" if stat.get("std") is not None else "")


def half_growth(doc):
    """e^{-slope} of log ‖∂L/∂W_l‖ (mean over seeds × batches) against l over the input-side
    half of the layers: the growth where it is largest, if the profile is not one line."""
    layers = doc["gradients"]["layers"]
    half = [g for g in layers[: max(2, (len(layers) + 1) // 2)] if g["norm"]["mean"]]
    if len(half) < 2:
        return None
    x = [g["index"] for g in half]
    y = [math.log(g["norm"]["mean"]) for g in half]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return {"mean": math.exp(-slope), "std": None}


for by_label in data.values():
    for by_depth in by_label.values():
        for doc in by_depth.values():
            doc["summary"]["grad_growth_input_half"] = half_growth(doc)

keys = [("grad_growth", "grad growth /layer"),
        ("grad_growth_input_half", "growth, input half"), ("grad_first_last", "grad first/last"),
        ("cos_sim_deepest", "cos sim deepest"), ("stable_rank_deepest", "stable rank deepest"),
        ("erank_deepest", "eff. rank deepest"),
        ("branch_skip_last_block", "branch/skip last block")]
with open(out / "signal_study.md", "w") as md:
    for sweep, by_label in data.items():
        md.write(f"\n{sweep}: mean ± std over the measurements (seeds × batches)\n\n")
        md.write("| setting | depth | " + " | ".join(k[1] for k in keys) + " |\n")
        md.write("|---" * (len(keys) + 2) + "|\n")
        for label, by_depth in by_label.items():
            for depth in sorted(by_depth):
                s = by_depth[depth]["summary"]
                md.write(f"| {label} | {depth} | "
                         + " | ".join(fmt(s.get(k)) for k, _ in keys) + " |\n")
print((out / "signal_study.md").read_text())

colors = {}


def color(label):
    return colors.setdefault(label, f"C{len(colors) % 10}")


def panel(ax, by_label, key, log=False, x=lambda d: d, skip=()):
    for label, by_depth in by_label.items():
        if label in skip:
            continue
        depths = sorted(d for d in by_depth if by_depth[d]["summary"][key]["mean"] is not None)
        ys = [by_depth[d]["summary"][key]["mean"] for d in depths]
        es = [by_depth[d]["summary"][key]["std"] or 0 for d in depths]
        if not depths:
            continue
        ax.errorbar([x(d) for d in depths], ys, yerr=es, marker="o", capsize=2, color=color(label),
                    linewidth=3 if label == "custom" else 1.3, label=label)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


if {"plain", "resnet"} <= data.keys():
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    for row, sweep in enumerate(("plain", "resnet")):
        panel(axes[row, 0], data[sweep], "grad_growth")
        axes[row, 0].axhline(YANG, color="k", linestyle="--", linewidth=1,
                             label="Yang et al. √(π/(π−1))")
        axes[row, 0].set_title(f"{sweep}: gradient growth per layer toward the input")
        panel(axes[row, 1], data[sweep], "grad_first_last", log=True)
        axes[row, 1].set_title(f"{sweep}: ‖∂L/∂W_first‖ / ‖∂L/∂W_last‖")
        for ax in axes[row]:
            ax.set_xlabel("depth")
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    fig.suptitle("Gradients at init against depth (mean ± std over seeds × batches)")
    fig.tight_layout()
    fig.savefig(out / "depth_gradients.png", dpi=80)
    fig = Figure(figsize=(15, 8))
    axes = fig.subplots(2, 3)
    for row, sweep in enumerate(("plain", "resnet")):
        for col, (key, title) in enumerate((("cos_sim_deepest", "mean cosine similarity"),
                                            ("stable_rank_deepest", "stable rank of G"),
                                            ("erank_deepest", "effective rank of G"))):
            panel(axes[row, col], data[sweep], key, log=col > 0)
            axes[row, col].set_title(f"{sweep}: {title}, deepest slot input")
            axes[row, col].set_xlabel("depth")
    axes[0, 0].legend(fontsize="x-small", ncol=2)
    fig.suptitle("Sample Gram matrix (64 samples) at init against depth")
    fig.tight_layout()
    fig.savefig(out / "depth_rank.png", dpi=80)

# Gradient profile of the deepest net of each family: ‖∂L/∂W_l‖ over the last layer's,
# against l, with a line of Yang et al.'s rate for comparison.
if {"plain", "resnet"} & data.keys():
    fams = [f for f in ("plain", "resnet") if f in data]
    fig = Figure(figsize=(6.5 * len(fams), 4.5))
    axes = fig.subplots(1, len(fams), squeeze=False)[0]
    for ax, fam in zip(axes, fams):
        deepest = max(max(v) for v in data[fam].values())
        for label, by_depth in data[fam].items():
            if deepest not in by_depth:
                continue
            layers = by_depth[deepest]["gradients"]["layers"]
            last = layers[-1]["norm"]["mean"]
            if not last:
                continue
            ax.plot([g["index"] for g in layers],
                    [(g["norm"]["mean"] or math.nan) / last for g in layers], color=color(label),
                    linewidth=3 if label == "custom" else 1.3, label=label)
        n = len(layers)
        ax.plot([1, n], [YANG ** (n - 1), 1], "k--", linewidth=1,
                label="Yang et al. √(π/(π−1)) per layer")
        ax.set_yscale("log")
        ax.set_xlabel("layer l (1: nearest the input)")
        ax.set_ylabel("‖∂L/∂W_l‖ / ‖∂L/∂W_L‖")
        ax.set_title(f"{fam}{deepest}: gradient norm per layer at init")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "depth_grad_profile.png", dpi=80)

if "residual" in data or "resnet" in data:
    merged = {}
    for label in ("custom", "torch", "none"):
        if label in data.get("resnet", {}):
            merged[{"custom": "standard + BN", "torch": "standard + torch BN",
                    "none": "standard, no norm"}[label]] = data["resnet"][label]
    merged.update(data.get("residual", {}))
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    panel(left, merged, "branch_skip_last_block", log=True, x=math.sqrt)
    left.set_xlabel("√depth")
    left.set_title("branch / skip variance, last residual block")
    left.legend(fontsize="x-small")
    panel(right, merged, "var_last_block", log=True, x=math.sqrt)
    right.set_xlabel("√depth")
    right.set_title("output variance, last residual block")
    fig.suptitle("Residual branches at init (resnet, mean ± std over seeds × batches)")
    fig.tight_layout()
    fig.savefig(out / "residual_variance.png", dpi=80)
    # SPP of the deepest net: per block, branch/skip ratio and output variance.
    deepest = max(max(v) for v in merged.values())
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for label, by_depth in merged.items():
        if deepest not in by_depth:
            continue
        blocks = by_depth[deepest]["blocks"]
        idx = [b["index"] for b in blocks]
        for ax, key in ((left, "branch_skip_ratio"), (right, "var")):
            ys = [b[key]["mean"] if b[key]["mean"] is not None else math.nan for b in blocks]
            ax.plot(idx, ys, color=color(label), label=label,
                    linewidth=3 if label == "standard + BN" else 1.3)
    for ax, title in ((left, "branch / skip variance"), (right, "block output variance")):
        ax.set_yscale("log")
        ax.set_xlabel("residual block")
        ax.set_title(f"resnet{deepest}: {title}")
        ax.grid(True, alpha=0.3)
    left.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out / "residual_spp.png", dpi=80)
PY
for f in depth_gradients depth_grad_profile depth_rank residual_variance residual_spp; do
    [[ -e $OUT_DIR/$f.png ]] && publish "$OUT_DIR/$f.png" "$f"
done

# Study 3b: test accuracy after each epoch, final training loss, and whether the run diverged.
TRAIN_SWEEPS=()
for depth in $TRAIN_DEPTHS; do
    [[ -d $OUT_DIR/train_d$depth ]] && TRAIN_SWEEPS+=("$OUT_DIR/train_d$depth")
done
if ((${#TRAIN_SWEEPS[@]})); then
    bnlab compare "${TRAIN_SWEEPS[@]}" --format markdown --out "$OUT_DIR/train_table.md" \
        --figure "$OUT_DIR/train_lr.png" || log "compare train failed"
    cat "$OUT_DIR/train_table.md"
    python - "$OUT_DIR" "${TRAIN_SWEEPS[@]}" <<'PY' | tee "$OUT_DIR/train_study.md"
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

out, sweeps = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
rows = defaultdict(list)
for sweep in sweeps:
    for m in sorted(sweep.glob("*/metrics.json")):
        d = json.loads(m.read_text())
        name = m.parent.name.rsplit(",seed=", 1)[0]
        rows[(sweep.name.removeprefix("train_d"), name)].append(d)
print("| depth | setting | seeds | status (diverged at step) | test acc % per epoch "
      "| final train loss | wall s |")
print("|---|---|---|---|---|---|---|")
for (depth, name), runs in sorted(rows.items(), key=lambda r: (int(r[0][0]), r[0][1])):
    status = ", ".join(r.get("status", "?") + (f" ({r['diverged_step']})" if r.get("diverged")
                                                else "") for r in runs)
    accs = " / ".join(
        "[" + ", ".join(f"{100 * h['test_acc']:.1f}" for h in r.get("history", [])) + "]"
        for r in runs)
    losses = " / ".join(
        f"{r['history'][-1].get('train_loss', float('nan')):.3g}" if r.get("history") else "–"
        for r in runs)
    wall = " / ".join(f"{r.get('wall_time_s', float('nan')):.0f}" for r in runs)
    print(f"| {depth} | {name} | {len(runs)} | {status} | {accs} | {losses} | {wall} |")

fig = Figure(figsize=(5.5 * len(sweeps), 4))
axes = np.atleast_1d(fig.subplots(1, len(sweeps)))
for ax, sweep in zip(axes, sweeps):
    for i, m in enumerate(sorted(sweep.glob("*/metrics.json"))):
        d = json.loads(m.read_text())
        hist = d.get("history", [])
        if not hist:
            continue
        ax.plot([h["epoch"] for h in hist], [100 * h["test_acc"] for h in hist], marker="o",
                color=f"C{i}", label=f"{m.parent.name} ({d.get('status')})")
    ax.set_title(f"resnet{sweep.name.removeprefix('train_d')} at lr 0.1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy %")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="xx-small")
fig.tight_layout()
fig.savefig(out / "residual_train.png", dpi=80)
PY
    publish "$OUT_DIR/residual_train.png" residual_train
fi
