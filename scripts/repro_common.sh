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
# THREADS=1 sets bnlab's torch thread count. On a shared, loaded 2-core CPU one thread per job is
# 8-30x faster than torch's default of one per core (threads waiting on each other; measured
# 2026-11-30: cnn custom BN 832 vs 106 img/s at batch 128, 203 vs 6 img/s at batch 2); results
# agree with a multi-thread run to ~6 digits, not bit for bit (reductions split differently).
[[ -n ${THREADS:-} ]] && DEVICE_ARGS+=("threads=$THREADS")
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
    # ANALYZE_ONLY=1: train nothing, redo the tables and figures from the runs on disk (e.g.
    # after stopping a sweep early; unfinished runs are listed apart or left out).
    if [[ ${ANALYZE_ONLY:-0} == 1 ]]; then
        log "sweep $subdir: skipped (ANALYZE_ONLY=1)"
        return 0
    fi
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

# study_table RUN_DIR... -- COLUMN...: a markdown table, one row per setting (the run dir's name
# with its seed=N override taken out), mean ± std over seeds, for the numbers the study scripts
# need beyond `bnlab compare`'s columns. A COLUMN is
#   m:KEY              metrics.json KEY (accuracies in percent)
#   h:KEY@EPOCH        history[EPOCH-1][KEY] (per-epoch test_acc, test_acc_precise_bn, ...)
#   h:KEY@last         the last history entry's KEY
#   f:FILE:KEY         KEY of the JSON file FILE in the run dir (numbers a script computed
#                      after training, e.g. study_dbn.sh's batch_eval.json); accuracies in
#                      percent
#   e:PREFIX[:AGG]     event scalars whose tag starts with PREFIX: per tag (layer) the mean over
#                      steps (AGG=mean, default), the last value (last), the first (first) or
#                      the first at or after step N (at=N), then the mean over tags;
#                      non-finite values left out
#   d:a-b              column a minus column b (both by index, 0-based), per seed
# PREFIX may list alternatives, a|b|c (tags starting with any of them). LABEL=COLUMN (LABEL
# without ':') names the column's header.
# Diverged runs enter m:/e: columns like finished ones; h: columns of epochs they did not reach
# are left out of the mean (the count per cell says how many seeds made it).
study_table() {
    python - "$@" <<'PY'
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from bnlab.analysis.events import read_events

args = sys.argv[1:]
split = args.index("--")
dirs, cols = [Path(d) for d in args[:split]], args[split + 1:]
labels = []
for i, col in enumerate(cols):
    head, eq, rest = col.partition("=")
    named = eq and ":" not in head
    labels.append(head if named else col)
    cols[i] = rest if named else col


def value(run_dir, metrics, events, col):
    kind, _, spec = col.partition(":")
    if kind == "m":
        v = metrics.get(spec)
    elif kind == "f":
        name, _, key = spec.partition(":")
        path = run_dir / name
        v = json.loads(path.read_text()).get(key) if path.exists() else None
        spec = key  # for the percent rule below
    elif kind == "h":
        key, _, epoch = spec.partition("@")
        hist = metrics.get("history") or []
        if epoch == "last":
            entry = hist[-1] if hist else {}
        else:
            entry = hist[int(epoch) - 1] if len(hist) >= int(epoch) else {}
        v = entry.get(key)
    elif kind == "e":
        prefix, _, agg = spec.partition(":")
        per_tag = []
        for tag, series in events.scalars.items():
            if not tag.startswith(tuple(prefix.split("|"))):
                continue
            vals = series.values[np.isfinite(series.values)]
            if vals.size:
                if agg.startswith("at="):  # the first value logged at or after step N
                    later = series.steps[np.isfinite(series.values)] >= int(agg[3:])
                    if later.any():
                        per_tag.append(vals[later][0])
                    continue
                per_tag.append({"last": vals[-1], "first": vals[0]}.get(agg, vals.mean()))
        v = float(np.mean(per_tag)) if per_tag else None
    else:
        raise SystemExit(f"study_table: unknown column {col}")
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok:
        return None
    return 100 * v if "acc" in spec.split("@")[0].split(":")[0] else float(v)


rows = defaultdict(list)  # setting -> per-run list of column values
root = Path(os.path.commonpath([d.resolve() for d in dirs])) if len(dirs) > 1 else dirs[0].resolve().parent
for d in dirs:
    mfile = d / "metrics.json"
    if not mfile.exists():
        continue
    metrics = json.loads(mfile.read_text())
    if metrics.get("status") not in ("completed", "diverged"):
        continue
    need_events = any(c.startswith("e:") for c in cols)
    events = read_events(d, histograms=False) if need_events else None
    vals = []
    for col in cols:
        if col.startswith("d:"):
            a, b = (int(i) for i in col[2:].split("-"))
            vals.append(None if vals[a] is None or vals[b] is None else vals[a] - vals[b])
        else:
            vals.append(value(d, metrics, events, col))
    # The path below the dirs' common folder, so a setting named by its sweep dir(s) shows.
    rel = d.resolve().relative_to(root).as_posix().replace("/", ",")
    setting = re.sub(r",?seed=\d+", "", rel).strip(",")
    rows[setting].append(vals)


def cell(values):
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    fmt = (lambda x: f"{x:.3g}") if max(abs(x) for x in v) < 10 else (lambda x: f"{x:.1f}")
    text = fmt(statistics.fmean(v))
    if len(v) > 1:
        text += f" ± {fmt(statistics.stdev(v))}"
    return text + (f" ({len(v)})" if len(v) != len(values) else "")


# Label each row by the overrides that differ between rows (the rest is the same everywhere).
parts = {s: s.split(",") for s in rows}
common = set.intersection(*(set(p) for p in parts.values())) if len(rows) > 1 else set()
print("| setting | seeds | " + " | ".join(labels) + " |")
print("|---" * (len(cols) + 2) + "|")
for setting in sorted(rows, key=lambda s: [int(t) if t.isdigit() else t
                                           for t in re.split(r"(\d+)", s)]):
    runs = rows[setting]
    label = ",".join(p for p in parts[setting] if p not in common) or setting
    print(f"| {label} | {len(runs)} | "
          + " | ".join(cell([r[i] for r in runs]) for i in range(len(cols))) + " |")
PY
}
