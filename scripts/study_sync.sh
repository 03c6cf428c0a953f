#!/usr/bin/env bash
# SyncBN against per-device BN. Under data-parallel training (DDP) each process normalizes its
# own shard of the batch: per-device BN, which is Ghost BN with the per-device batch as the
# virtual batch. Goyal et al. 2017 (Sec. 2.3) keep the per-worker BN batch n = 32 fixed when they
# scale the total batch, because n is part of the loss that is optimized; Wu & He 2018 (Fig. 1)
# show BN's error rising as the batch per worker shrinks, and point to synchronized BN (Peng et
# al. 2018, MegDet) as what pools the statistics over devices. The questions here, with NPROC
# processes (2 on CPU, gloo) and per-device batches PER_DEVICE:
#   (a) does per-device BN at small shards lose what Ghost BN at the same virtual batch loses
#       (section 8 of docs/reproductions.md), and
#   (b) does SyncBN recover it, i.e. train like BN on the global batch?
#
# Five arms per per-device batch p (global batch B = NPROC x p, the same lr for all five):
#   ddp/pd_p      norm=custom,sync,torch under DDP (dist.nproc=NPROC): per-device BN (bnlab's
#                 and torch's nn.BatchNorm2d) and SyncBN
#   bn/pd_p       norm=custom in one process at batch B: BN on the global batch -- what SyncBN
#                 must equal up to float rounding
#   ghost/pd_p    norm=ghost, virtual_batch_size=p, in one process at batch B -- what per-device
#                 BN must equal up to float rounding (running statistics included)
# torch's own nn.SyncBatchNorm refuses CPU tensors, so SyncBN has no torch twin here.
#
# The learning rate follows section 8: lr = 0.1 x B / 128 (Goyal et al.'s linear scaling with
# the *global* batch, base 0.1 = BN's best lr at batch 128, section 1), the same epochs for
# every p, cosine schedule. So at each p the five arms take the same SGD steps (same images,
# same lr); they differ only in which samples a BN layer normalizes over, and the per-device-BN
# vs SyncBN difference at one p is the effect of the normalization batch alone.
#
#   bash scripts/study_sync.sh                      # CIFAR-10 subset on CPU, 2 processes
#   THREADS=1 SEEDS=0,1 bash scripts/study_sync.sh  # as run for docs/reproductions.md
#   FULL=1 DATA_ROOT=data bash scripts/study_sync.sh  # GPU node: 8 processes (NCCL), resnet20
#   SMOKE=1 bash scripts/study_sync.sh              # pipeline check
#   ANALYZE_ONLY=1 bash scripts/study_sync.sh       # tables and figures from the runs on disk
# Results: outputs/repro/sync/{table.md,study.md,sync.png}; figure docs/figures/sync.png
REPRO_NAME=sync
# shellcheck source=scripts/repro_common.sh
source "$(dirname "$0")/repro_common.sh"

# 2,000 images x 3 epochs: section 8's protocol, so that BN at the global batch 2p here is
# section 8's BN at batch 2p, and small shards take many steps (every DDP job also pays the
# start-up of torch's launcher and its processes); the wall times are in section 16 of
# docs/reproductions.md.
NPROC=${NPROC:-$(pick 2 8)}
EPOCHS=${EPOCHS:-$(pick 3 20)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick 2000 null)}
# Per-device batch 2 extends the issue's grid (4-64) down to where section 8's BN collapses.
PER_DEVICE=${PER_DEVICE:-$(pick 2,4,8,16,32,64 2,4,8,16,32,64 4,64)}
BASE_LR=${BASE_LR:-0.1}
# FULL: global batches up to 512 (lr 0.4): Goyal et al.'s gradual warm-up.
WARMUP=${WARMUP:-$(pick 0 2)}

lr_for() {  # linear scaling with the global batch: base x batch / 128
    python -c "print(f'{$BASE_LR * $1 / 128:.6g}')"
}

COMMON=(
    "seed=$(seeds 0,1 0,1,2)"
    "epochs=$EPOCHS"
    "data.train_size=$TRAIN_SIZE"
    "model=$(pick cnn resnet20)"
    "sched.warmup_epochs=$WARMUP"
    probe=off
)
IFS=, read -r -a pd_list <<< "$PER_DEVICE"
for p in "${pd_list[@]}"; do
    b=$((NPROC * p))
    lr=$(lr_for "$b")
    # Each job of a sweep with dist.nproc > 1 hands over to torch's elastic launcher in its own
    # job dir (bnlab.hydra_app._job): the jobs run one after another, each on NPROC processes
    # of THREADS threads.
    # shellcheck disable=SC2016  # ${...}: Hydra interpolations, resolved per job
    sweep "ddp/pd_$p" "dist.nproc=$NPROC" norm=custom,sync,torch "batch_size=$b" \
        "optim.lr=$lr" "${COMMON[@]}" 'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
    # shellcheck disable=SC2016
    sweep "bn/pd_$p" norm=custom "batch_size=$b" "optim.lr=$lr" "${COMMON[@]}" \
        'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
    # shellcheck disable=SC2016
    sweep "ghost/pd_$p" norm=ghost "norm.virtual_batch_size=$p" "batch_size=$b" \
        "optim.lr=$lr" "${COMMON[@]}" 'hydra.sweep.subdir="norm=${norm.name},seed=${seed}"'
done

# One step, exactly: the parameter gradients and the running statistics after one training
# step of the cnn under DDP (2 gloo processes, bnlab's own wrapper and buffer averaging, half
# the batch each) against one process on the whole batch, at a global batch of 8 (p = 4) and
# 128 (p = 64), in float64 (the formulas) and float32 (what training uses, NHWC as on the
# CPU), for each DDP arm and its one-process twin; and what torch's nn.SyncBatchNorm says to a
# CPU tensor. Seconds; not a training run.
if [[ ${ANALYZE_ONLY:-0} != 1 || ! -s $OUT_DIR/exactness.md ]]; then
    cat > "$OUT_DIR/exactness.py" <<'PY'
import torch
import torch.distributed as dist

from bnlab import distributed
from bnlab.data import shard
from bnlab.registry import load_option

torch.set_num_threads(1)
WORLD = distributed.start()
CPU = torch.device("cpu")


def step(norm, x64, y, part, ddp, dtype, **kw):
    """One training step's parameter gradients, and the floating-point buffers (running
    statistics) after it, as float64: under DDP as bnlab trains (``distributed.wrap``, then
    ``average_buffers``) on this process's ``part`` of the batch, else on the whole batch."""
    torch.manual_seed(0)
    model = load_option("model", "cnn").build(load_option("norm", norm, **kw))
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    x = x64[part].to(dtype).contiguous(memory_format=torch.channels_last)
    net = distributed.wrap(model, WORLD, CPU) if ddp else model
    torch.nn.functional.cross_entropy(net(x), y[part]).backward()
    if ddp:
        distributed.average_buffers(WORLD, model)
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    buffers = {n: b.double() for n, b in model.named_buffers() if b.is_floating_point()}
    return grads, buffers


def opts(kw):
    return "".join(f" norm.{k}={v}" for k, v in kw.items())


def worst(a, b):
    """The largest relative difference ‖a − b‖ / ‖b‖ over the tensors, and its name."""
    return max((float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)), k) for k in b)


rows = []
for B in (8, 128):
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(B, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 + 0.5
    y = torch.randint(0, 10, (B,), generator=gen)
    part = shard(B, WORLD.rank, WORLD.size)  # this rank's samples, as in training
    p = B // WORLD.size
    pairs = [  # (DDP norm and options, one-process norm and options)
        (("sync", {}), ("custom", {})),
        (("sync", {}), ("custom", {"fast": False})),
        (("custom", {}), ("ghost", {"virtual_batch_size": p})),
        (("torch", {}), ("ghost", {"virtual_batch_size": p})),
        (("custom", {}), ("custom", {})),  # the contrast: per-device BN is not BN on the batch
    ]
    exact = {}  # pair -> the twin's float64 gradients
    for dtype in (torch.float64, torch.float32):
        for i, ((dn, dkw), (on, okw)) in enumerate(pairs):
            ga, ba = step(dn, x64, y, part, True, dtype, **dkw)
            if not WORLD.main:  # the twins have no synchronized layer: rank 0 alone runs them
                continue
            gb, bb = step(on, x64, y, slice(None), False, dtype, **okw)
            w = worst(ga, gb)
            # float32: each side's gradient error against the twin's float64 gradient
            errs = ["–", "–"] if dtype == torch.float64 else [
                f"{worst(g, exact[i])[0]:.1e}" for g in (ga, gb)]
            exact.setdefault(i, gb)
            wb = worst(ba, bb)
            rows.append(f"| {B} ({p}) | {str(dtype).removeprefix('torch.')} | DDP norm={dn}"
                        f"{opts(dkw)} | 1 process norm={on}{opts(okw)} | {w[0]:.1e} | `{w[1]}` "
                        f"| {errs[0]} | {errs[1]} | {wb[0]:.1e} | `{wb[1]}` |")
try:
    torch.nn.SyncBatchNorm(4).train()(torch.randn(4, 4, 2, 2))
    refusal = "(no error)"
except Exception as e:  # what torch says to a CPU tensor under a process group
    refusal = f"{type(e).__name__}: {e}"
if WORLD.main:
    print(f"One SGD step at global batch B over {WORLD.size} processes (p = B / {WORLD.size} "
          f"each; backend {dist.get_backend()}), cnn, NHWC: the largest relative difference of a "
          "parameter's gradient and of a running-statistics buffer after the step, "
          "‖a − b‖ / ‖b‖:\n")
    print("| B (p) | dtype | DDP arm | one-process twin | worst gradient difference | tensor "
          "| DDP arm's gradient error vs float64 twin | twin's error vs float64 twin "
          "| worst buffer difference | buffer |")
    print("|---" * 10 + "|")
    print("\n".join(rows))
    print(f"\ntorch.nn.SyncBatchNorm on a CPU tensor in a gloo group: `{refusal}`")
distributed.finish()
PY
    log "exactness check: $OUT_DIR/exactness.md"
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 "$OUT_DIR/exactness.py" \
        > "$OUT_DIR/exactness.md"
fi
cat "$OUT_DIR/exactness.md"

bnlab compare "$OUT_DIR"/ddp "$OUT_DIR"/bn "$OUT_DIR"/ghost --format markdown \
    --out "$OUT_DIR/table.md" --figure "$OUT_DIR/lr.png"
cat "$OUT_DIR/table.md"

study_table "$OUT_DIR"/{ddp,bn,ghost}/pd_*/*/ -- m:final_test_acc m:final_train_acc \
    m:final_train_loss m:wall_time_s m:images_per_s | tee "$OUT_DIR/study.md"

# The study's table (accuracy per arm and p, the SyncBN - per-device gap per seed) and the
# exactness checks (each DDP arm against its one-process twin: per-step training loss, final
# weights and running statistics, accuracy), then the figure.
python - "$OUT_DIR" "$NPROC" "$BASE_LR" <<'PY' | tee -a "$OUT_DIR/study.md"
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from bnlab.analysis.events import read_events

out, nproc, base_lr = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ARMS = {  # arm -> (sweep dir, norm): label
    ("ddp", "custom"): "per-device BN (DDP, bnlab)",
    ("ddp", "torch"): "per-device BN (DDP, torch)",
    ("ghost", "ghost"): "Ghost BN, vbs = p (1 process)",
    ("ddp", "sync"): "SyncBN (DDP)",
    ("bn", "custom"): "BN at the global batch (1 process)",
}
TWINS = {"per-device BN vs Ghost BN": (("ddp", "custom"), ("ghost", "ghost")),
         "SyncBN vs BN at the global batch": (("ddp", "sync"), ("bn", "custom")),
         "per-device torch BN vs Ghost BN": (("ddp", "torch"), ("ghost", "ghost")),
         # the contrast, not a twin: the shards are normalized apart from step 1 on
         "contrast: per-device BN vs BN at the global batch": (("ddp", "custom"),
                                                               ("bn", "custom"))}
DRAWN = ("per-device BN vs Ghost BN", "SyncBN vs BN at the global batch")  # right panel
runs = {}  # (arm, p, seed) -> run dir
for m in out.glob("*/pd_*/*/metrics.json"):
    metrics = json.loads(m.read_text())
    if metrics.get("status") not in ("completed", "diverged"):
        continue
    kind, p = m.parent.parent.parent.name, int(m.parent.parent.name.removeprefix("pd_"))
    runs[(kind, metrics["config"]["norm"]), p, metrics["config"]["seed"]] = m.parent


def metric(d: Path, key: str) -> float:
    v = json.loads((d / "metrics.json").read_text()).get(key)
    return float("nan") if v is None else float(v)


def fmt(values: list[float], scale: float = 100.0, signed: bool = False) -> str:
    v = [scale * x for x in values if np.isfinite(x)]
    if not v:
        return "–"
    text = f"{statistics.fmean(v):+.1f}" if signed else f"{statistics.fmean(v):.1f}"
    return text + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "") + (
        f" ({len(v)})" if len(v) != len(values) else "")


ps = sorted({p for _, p, _ in runs})
seeds = sorted({s for _, _, s in runs})
acc = defaultdict(dict)  # arm -> p -> [acc per seed]
for arm in ARMS:
    for p in ps:
        acc[arm][p] = [metric(runs[arm, p, s], "final_test_acc") if (arm, p, s) in runs
                       else float("nan") for s in seeds]
print(f"\nFinal test accuracy % (mean ± std over seeds {seeds}; {nproc} processes, per-device "
      f"batch p, global batch B, lr = {base_lr:g} x B / 128); the gap is SyncBN minus "
      "per-device BN (bnlab), per seed:\n")
print("| p (B, lr) | " + " | ".join(ARMS.values()) + " | SyncBN − per-device |")
print("|---" * (len(ARMS) + 2) + "|")
for p in ps:
    gap = [a - b for a, b in zip(acc["ddp", "sync"][p], acc["ddp", "custom"][p], strict=True)]
    b = nproc * p
    print(f"| {p} ({b}, {base_lr * b / 128:.4g}) | "
          + " | ".join(fmt(acc[arm][p]) for arm in ARMS) + f" | {fmt(gap, signed=True)} |")


def loss_curve(d: Path) -> tuple[np.ndarray, np.ndarray]:
    s = read_events(d, histograms=False).scalars["train/loss"]
    return np.asarray(s.steps), np.asarray(s.values, dtype=np.float64)


def weights(d: Path) -> dict[str, torch.Tensor]:
    return torch.load(d / "checkpoint.pt", weights_only=True, map_location="cpu")["model"]


print("\nEach DDP arm against its one-process twin (same seed): the training loss per step "
      "(largest relative difference over the first 10 steps and over the run), the largest "
      "relative difference of a final weight or running-statistics tensor (‖a − b‖ / ‖b‖), "
      "and the final test accuracy difference in points:\n")
print("| pair | p | seed | Δloss, steps 1–10 | Δloss, all steps | Δweights (worst tensor) "
      "| worst tensor | Δtest acc |")
print("|---|---|---|---|---|---|---|---|")
curves = {}  # (pair, p, seed) -> (steps, relative loss difference)
for pair, (a, b) in TWINS.items():
    for p in ps:
        for s in seeds:
            if (a, p, s) not in runs or (b, p, s) not in runs:
                continue
            da, db = runs[a, p, s], runs[b, p, s]
            (sa, la), (sb, lb) = loss_curve(da), loss_curve(db)
            n = min(len(sa), len(sb))
            assert np.array_equal(sa[:n], sb[:n])
            rel = np.abs(la[:n] - lb[:n]) / np.abs(lb[:n])
            curves[pair, p, s] = sa[:n], rel
            wa, wb = weights(da), weights(db)
            assert wa.keys() == wb.keys()
            worst = max((float((wa[k].double() - wb[k].double()).norm()
                               / wb[k].double().norm().clamp_min(1e-30)), k)
                        for k in wa if wa[k].is_floating_point())
            dacc = 100 * (metric(da, "final_test_acc") - metric(db, "final_test_acc"))
            print(f"| {pair} | {p} | {s} | {rel[:10].max():.1e} | {rel.max():.1e} | "
                  f"{worst[0]:.1e} | `{worst[1]}` | {dacc:+.2f} |")

fig = Figure(figsize=(12.5, 4.2))
ax, ax2 = fig.subplots(1, 2)
styles = {("ddp", "custom"): ("C0", "-", 3.0), ("ddp", "torch"): ("C9", "-", 1.2),
          ("ghost", "ghost"): ("C1", "--", 1.5), ("ddp", "sync"): ("C3", "-", 3.0),
          ("bn", "custom"): ("C2", "--", 1.5)}
offsets = dict(zip(ARMS, np.linspace(-0.06, 0.06, len(ARMS)), strict=True))  # (log2 units)
for arm, label in ARMS.items():
    xs = [p for p in ps if np.isfinite(acc[arm][p]).any()]
    if not xs:
        continue
    color, ls, lw = styles[arm]
    shift = [p * 2 ** offsets[arm] for p in xs]
    per_seed = [100 * np.asarray(acc[arm][p]) for p in xs]
    mean = [np.nanmean(v) for v in per_seed]
    # sample std over seeds (ddof 1, as in the table); 0 where only one seed finished
    std = [np.std(v[np.isfinite(v)], ddof=1) if np.isfinite(v).sum() > 1 else 0.0
           for v in per_seed]
    ax.errorbar(shift, mean, yerr=std, color=color, linestyle=ls, linewidth=lw, marker="o",
                markersize=4, capsize=3, label=label)
    for x, v in zip(shift, per_seed, strict=True):
        ax.plot([x] * len(v), v, color=color, marker="x", linestyle="none", markersize=4,
                alpha=0.6)
ax.set_xscale("log", base=2)
ax.set_xticks(ps, labels=[str(p) for p in ps])
ax.minorticks_off()
ax.set_xlabel(f"per-device batch p ({nproc} processes, global batch {nproc}p, "
              f"lr {base_lr:g} x {nproc}p / 128)")
ax.set_ylabel("final test accuracy %\n(line: mean ± std over seeds; x: each seed)")
ax.set_title("SyncBN vs per-device BN")
ax.grid(True, alpha=0.3)
ax.legend(fontsize="small")
for i, p in enumerate(ps):
    for (pair, q, s), (steps, rel) in curves.items():
        if q != p or s != seeds[0] or pair not in DRAWN:
            continue
        ok = rel > 0
        ax2.plot(steps[ok], rel[ok], color=f"C{i}", linewidth=0.8,
                 linestyle="-" if pair.startswith("SyncBN") else ":",
                 label=f"p={p}: {'SyncBN' if pair.startswith('SyncBN') else 'per-device'}")
ax2.set_yscale("log")
ax2.set_xscale("log")
ax2.set_xlabel("step")
ax2.set_ylabel("|loss(DDP) − loss(1 process)| / loss")
ax2.set_title(f"DDP vs its one-process twin, seed {seeds[0] if seeds else ''}\n"
              "solid: SyncBN vs BN at B; dotted: per-device BN vs Ghost BN", fontsize="medium")
ax2.grid(True, alpha=0.3)
ax2.legend(fontsize="x-small", ncol=2)
fig.tight_layout()
fig.savefig(out / "sync.png", dpi=80)
PY
publish "$OUT_DIR/sync.png" sync
