# shellcheck shell=bash
# Shared by scripts/reproduce_*.sh (sourced, not run). Sets up the three scales a reproduction
# runs at and the helpers every script uses, so each script only states its experiment.
#
#   (default)  the CIFAR-10 subset on CPU: ../shared/data/cifar10-subset, small grids sized to
#              finish in about 30 minutes on a 2-core CPU
#   FULL=1     full CIFAR-10 on a GPU with paper-like settings (DATA_ROOT: a folder holding
#              cifar-10-batches-py, default ./data; DEVICE, default cuda)
#   SMOKE=1    a seconds-long pass over the whole pipeline (synthetic data, one epoch) that
#              checks the script, not the science
#
# Outputs: sweeps in outputs/repro/<name>/ (outputs/repro-full/, outputs/repro-smoke/), final
# figures copied to docs/figures/ (FULL: a _full suffix, so the committed subset figures stay;
# SMOKE: nowhere under docs/, they stay next to the sweeps).
# Every sweep runs with resume=true: re-running a script skips finished jobs and continues an
# interrupted one, so a script killed halfway costs only the unfinished job.

set -euo pipefail

: "${REPRO_NAME:?set REPRO_NAME before sourcing repro_common.sh}"

# Run from the repo root whatever the caller's cwd, so relative paths below mean one thing.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

FULL=${FULL:-0}
SMOKE=${SMOKE:-0}
if [[ $FULL == 1 && $SMOKE == 1 ]]; then
    echo "error: FULL=1 and SMOKE=1 exclude each other" >&2
    exit 2
fi

if [[ $SMOKE == 1 ]]; then
    SCALE=smoke
    OUT_DIR=outputs/repro-smoke/$REPRO_NAME
    FIG_DIR=$OUT_DIR/figures
    FIG_SUFFIX=""
    # Synthetic data has no root; sweep() replaces every script's epochs and sizes.
    DATA_ARGS=(data=synthetic)
    DEVICE_ARGS=(device=cpu)
elif [[ $FULL == 1 ]]; then
    SCALE=full
    OUT_DIR=outputs/repro-full/$REPRO_NAME
    FIG_DIR=docs/figures
    FIG_SUFFIX=_full
    DATA_ROOT=${DATA_ROOT:-data}
    # train/test_size null: the whole 50k/10k.
    DATA_ARGS=(data=cifar10 "data.root=$DATA_ROOT" data.train_size=null data.test_size=null)
    DEVICE_ARGS=("device=${DEVICE:-cuda}")
else
    SCALE=subset
    OUT_DIR=outputs/repro/$REPRO_NAME
    FIG_DIR=docs/figures
    FIG_SUFFIX=""
    DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10-subset}
    DATA_ARGS=(data=cifar10 "data.root=$DATA_ROOT")
    DEVICE_ARGS=(device=cpu)
fi
mkdir -p "$OUT_DIR" "$FIG_DIR"

# pick SUBSET FULL [SMOKE]: the value for the current scale (SMOKE defaults to SUBSET).
pick() {
    case $SCALE in
        full) echo "$2" ;;
        smoke) echo "${3:-$1}" ;;
        *) echo "$1" ;;
    esac
}

# seeds SUBSET FULL: the seed list for the scale; SEEDS=0 (or 0,1,2) overrides it, e.g. to fit a
# slow or shared machine. Smoke runs use seed 0.
seeds() {
    echo "${SEEDS:-$(pick "$1" "$2" 0)}"
}

# sweep SUBDIR OVERRIDE...: one bnlab sweep into $OUT_DIR/SUBDIR with the scale's data and
# device. Smoke runs append their own sizes last, so that they win over the script's.
sweep() {
    local subdir=$1
    shift
    local smoke_args=()
    [[ $SCALE == smoke ]] && smoke_args=(epochs=1 data.train_size=512 data.test_size=256)
    log "sweep $subdir: $*"
    bnlab train -m "${DATA_ARGS[@]}" "${DEVICE_ARGS[@]}" progress=false resume=true \
        "hydra.sweep.dir=$OUT_DIR/$subdir" "$@" "${smoke_args[@]}"
}

# run_dir SUBDIR PATTERN: the one job dir of sweep SUBDIR whose name matches PATTERN (a glob on
# the override-named dirs, e.g. 'norm=custom,*seed=0'); fails loudly on none or several.
run_dir() {
    local matches=()
    local d
    for d in "$OUT_DIR/$1"/$2; do
        [[ -d $d ]] && matches+=("$d")
    done
    if [[ ${#matches[@]} -ne 1 ]]; then
        echo "error: expected one run dir matching $OUT_DIR/$1/$2, found ${#matches[@]}" >&2
        return 1
    fi
    echo "${matches[0]}"
}

# publish FILE NAME: copy a figure to $FIG_DIR/NAME<suffix>.png and say where it went.
publish() {
    local dest=$FIG_DIR/$2$FIG_SUFFIX.png
    cp "$1" "$dest"
    log "figure: $dest ($(du -k "$dest" | cut -f1) KB)"
}

log() {
    echo "[$(date +%H:%M:%S)] $REPRO_NAME ($SCALE): $*" >&2
}

# Report the script's wall time on exit, whether it succeeded or not.
# shellcheck disable=SC2034  # read by the EXIT trap below
REPRO_START=$SECONDS
trap 'log "finished with status $? after $(( (SECONDS - REPRO_START) / 60 )) min $(( (SECONDS - REPRO_START) % 60 )) s"' EXIT
log "outputs in $OUT_DIR"

# scalar_figure OUT TITLE TAGS RUN_DIR...: one panel per scalar tag (TAGS comma-separated), one
# curve per run (colour: norm, line style: seed; custom BN thick, so torch BN on it shows), and on stdout a markdown table of each tag's
# mean over training, mean ± std over seeds per setting. For what `bnlab plot` does not draw
# (landscape/*) and for overlaying norms on shared axes (Santurkar et al. draw it so).
scalar_figure() {
    python - "$@" <<'PY'
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnlab.analysis.events import read_events
from bnlab.analysis.runs import load_run

out, title, tags, dirs = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4:]
runs = [(load_run(Path(d)), read_events(Path(d), histograms=False)) for d in dirs]
norms = list(dict.fromkeys(str(r.config.get("norm")) for r, _ in runs))
styles = ["-", "--", ":", "-."]
fig = Figure(figsize=(4.6 * len(tags), 3.6))
axes = fig.subplots(1, len(tags), squeeze=False)[0]
means = defaultdict(lambda: defaultdict(list))  # setting -> tag -> per-seed means
for run, events in runs:
    norm, seed = str(run.config.get("norm")), run.config.get("seed", 0)
    setting = f"norm={norm} lr={run.config.get('lr')}"
    for ax, tag in zip(axes, tags):
        series = events.scalars.get(tag)
        if series is None:
            continue
        ok = np.isfinite(series.values)
        ax.plot(series.steps[ok], series.values[ok], color=f"C{norms.index(norm)}",
                linestyle=styles[int(seed) % len(styles)], marker="." if ok.sum() <= 40 else None,
                # custom BN drawn thick, so torch BN's curve on top of it stays visible
                linewidth=3.0 if norm == "custom" else 1.3, label=f"{norm} seed {seed}")
        if ok.any():
            means[setting][tag].append(float(series.values[ok].mean()))
for ax, tag in zip(axes, tags):
    ax.set_title(tag, fontsize="medium")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    values = [line.get_ydata() for line in ax.get_lines()]
    if values and all(np.all(np.asarray(v) > 0) for v in values) and tag.split("/")[1] != "cos":
        ax.set_yscale("log")
axes[0].legend(fontsize="x-small")
fig.suptitle(title)
fig.tight_layout()
fig.savefig(out, dpi=80)
print("| setting | seeds | " + " | ".join(f"mean {t}" for t in tags) + " |")
print("|---" * (len(tags) + 2) + "|")
for setting, by_tag in means.items():
    cells = []
    for tag in tags:
        v = by_tag.get(tag, [])
        cells.append("–" if not v else f"{statistics.fmean(v):.3g}" +
                     (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else ""))
    n = max((len(v) for v in by_tag.values()), default=0)
    print(f"| {setting} | {n} | " + " | ".join(cells) + " |")
PY
}
