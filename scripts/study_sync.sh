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

# Sized from one timed run (section 12): on the busy 2-core CPU a DDP step at global batch 8
# costs about as much as 8 images of BN at batch 128 do, and every DDP job pays the start-up of
# torch's launcher and its 2 processes; 2,000 images x 3 epochs (section 8's protocol) fit the
# grid's 2 seeds in about an hour.
NPROC=${NPROC:-$(pick 2 8)}
EPOCHS=${EPOCHS:-$(pick 3 20)}
TRAIN_SIZE=${TRAIN_SIZE:-$(pick 2000 null)}
# Per-device batch 2 extends the grid down to section 8's collapse (BN at batch 2: 18 %).
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

# One step, exactly: the parameter gradients of the cnn under DDP (2 gloo processes, half the
# batch each) against one process on the whole batch, in float64 (the formulas) and float32
# (what training uses, NHWC as on the CPU), for each DDP arm and its one-process twin; and what
# torch's nn.SyncBatchNorm says to a CPU tensor. Seconds; not a training run.
if [[ ${ANALYZE_ONLY:-0} != 1 || ! -s $OUT_DIR/exactness.md ]]; then
    cat > "$OUT_DIR/exactness.py" <<'PY'
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bnlab.registry import load_option

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
B = 128
gen = torch.Generator().manual_seed(1)
x64 = torch.randn(B, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 + 0.5
y = torch.randint(0, 10, (B,), generator=gen)
part = slice(rank * B // world, (rank + 1) * B // world)


def grads(norm, batch, ddp, dtype, **kw):
    torch.manual_seed(0)
    model = load_option("model", "cnn").build(load_option("norm", norm, **kw))
    model = model.to(dtype=dtype, memory_format=torch.channels_last)
    x = x64[batch].to(dtype).contiguous(memory_format=torch.channels_last)
    net = DistributedDataParallel(model, broadcast_buffers=False) if ddp else model
    loss = torch.nn.functional.cross_entropy(net(x), y[batch])
    loss.backward()
    return {n: p.grad.double() for n, p in model.named_parameters()}


def opts(kw):
    return "".join(f" norm.{k}={v}" for k, v in kw.items())


PAIRS = [  # (DDP norm and options, one-process norm and options)
    (("sync", {}), ("custom", {})),
    (("sync", {}), ("custom", {"fast": False})),
    (("custom", {}), ("ghost", {"virtual_batch_size": B // world})),
    (("torch", {}), ("ghost", {"virtual_batch_size": B // world})),
    (("custom", {}), ("custom", {})),  # the contrast: per-device BN is not BN on the batch
]


def worst(a, b):
    return max((float((a[k] - b[k]).norm() / b[k].norm()), k) for k in b)


rows, exact = [], {}
for dtype in (torch.float64, torch.float32):
    for i, ((dn, dkw), (on, okw)) in enumerate(PAIRS):
        a = grads(dn, part, True, dtype, **dkw)
        # The twins have no synchronized layer, so rank 0 alone computes them.
        b = grads(on, slice(None), False, dtype, **okw) if rank == 0 else None
        if rank == 0:
            w = worst(a, b)
            # float32: each side's error against the twin's float64 gradient
            errs = ["–", "–"] if dtype == torch.float64 else [
                f"{worst(g, exact[i])[0]:.1e}" for g in (a, b)]
            exact.setdefault(i, b)
            rows.append(f"| {str(dtype).removeprefix('torch.')} | DDP norm={dn}{opts(dkw)} | "
                        f"1 process norm={on}{opts(okw)} | {w[0]:.1e} | `{w[1]}` | "
                        f"{errs[0]} | {errs[1]} |")
try:
    torch.nn.SyncBatchNorm(4).train()(torch.randn(4, 4, 2, 2))
    refusal = "(no error)"
except Exception as e:  # what torch says to a CPU tensor under a process group
    refusal = f"{type(e).__name__}: {e}"
if rank == 0:
    print(f"One SGD step's gradients, global batch {B} over {world} processes, cnn, NHWC "
          "(largest relative difference of a parameter's gradient, ‖a − b‖ / ‖b‖):\n")
    print("| dtype | DDP arm | one-process twin | worst gradient difference | tensor | DDP arm's "
          "error vs float64 twin | twin's error vs float64 twin |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntorch.nn.SyncBatchNorm on a CPU tensor in a gloo group: `{refusal}`")
dist.destroy_process_group()
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
python - "$OUT_DIR" "$NPROC" <<'PY' | tee -a "$OUT_DIR/study.md"
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from bnlab.analysis.events import read_events

out, nproc = Path(sys.argv[1]), int(sys.argv[2])
ARMS = {  # arm -> (sweep dir, norm): label
    ("ddp", "custom"): "per-device BN (DDP, bnlab)",
    ("ddp", "torch"): "per-device BN (DDP, torch)",
    ("ghost", "ghost"): "Ghost BN, vbs = p (1 process)",
    ("ddp", "sync"): "SyncBN (DDP)",
    ("bn", "custom"): "BN at the global batch (1 process)",
}
TWINS = {"per-device BN vs Ghost BN": (("ddp", "custom"), ("ghost", "ghost")),
         "SyncBN vs BN at the global batch": (("ddp", "sync"), ("bn", "custom"))}
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
      "batch p, global batch B, lr = 0.1 x B / 128); the gap is SyncBN minus per-device BN "
      "(bnlab), per seed:\n")
print("| p (B, lr) | " + " | ".join(ARMS.values()) + " | SyncBN − per-device |")
print("|---" * (len(ARMS) + 2) + "|")
for p in ps:
    gap = [a - b for a, b in zip(acc["ddp", "sync"][p], acc["ddp", "custom"][p], strict=True)]
    b = nproc * p
    print(f"| {p} ({b}, {0.1 * b / 128:.4g}) | "
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
for arm, label in ARMS.items():
    xs = [p for p in ps if np.isfinite(acc[arm][p]).any()]
    if not xs:
        continue
    err = [100 * (1 - np.nanmean(acc[arm][p])) for p in xs]
    std = [100 * np.nanstd(acc[arm][p]) for p in xs]
    color, ls, lw = styles[arm]
    ax.errorbar(xs, err, yerr=std, color=color, linestyle=ls, linewidth=lw, marker="o",
                capsize=2, label=label)
ax.set_xscale("log", base=2)
ax.set_xticks(ps, labels=[str(p) for p in ps])
ax.set_xlabel(f"per-device batch p ({nproc} processes, global batch {nproc}p, "
              f"lr 0.1 x {nproc}p / 128)")
ax.set_ylabel("test error % (mean ± std over seeds)")
ax.set_title("SyncBN vs per-device BN")
ax.grid(True, alpha=0.3)
ax.legend(fontsize="small")
for i, p in enumerate(ps):
    for (pair, q, s), (steps, rel) in curves.items():
        if q != p or s != seeds[0]:
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
