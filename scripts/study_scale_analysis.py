"""The tables and figures of scripts/study_scale.sh, from the runs on disk (the scale/ probe's
event scalars and metrics.json).

    python scripts/study_scale_analysis.py ROOT OUT_DIR TAG MOMENTUM WD WD_BIG NF_WD

ROOT holds the sweeps bn/, bn_exp/, sws/, none/, none_exp/ of one model; the markdown goes to
stdout, the figures to OUT_DIR/scale_angle<TAG>.png and OUT_DIR/scale_wd<TAG>.png.

Every angle is compared with the equilibrium sqrt(2ηλ/(1+α)) of a *reference* λ: the run's own
for λ > 0; for an exponential-lr run (λ = 0) the λ it stands in for, at the base lr of its arm
(Li & Arora's equivalence maps the λ > 0 run's directions onto it, so its angles should be the
λ > 0 run's); for a constant-lr run at λ = 0, which has no equilibrium, the λ > 0 run's of its
arm, to show how far it falls below. "Late" is the last quarter of the logged steps.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnlab.analysis.events import Series, read_events

ARMS = ("bn", "bn_exp", "sws", "none", "none_exp")
LATE = 0.75  # the late window starts at this fraction of the logged steps
CHANCE = 0.15  # final training accuracy below this: the run learnt nothing (10 classes)


@dataclass
class Run:
    arm: str  # bn, sws, none (an exponential-lr run: the arm of its λ > 0 twin)
    norm: str
    wd: str  # the λ of the run, or "exp<λ>" for the exponential lr standing in for λ
    seed: int
    metrics: dict
    scalars: dict[str, Series]

    @property
    def exp(self) -> bool:
        return self.wd.startswith("exp")

    @property
    def ref_wd(self) -> float:
        return float(self.wd.removeprefix("exp"))

    @property
    def label(self) -> str:
        lam = f"λ=0, exp lr of {self.wd[3:]}" if self.exp else f"λ={self.wd}"
        return f"{self.arm} {self.norm} {lam}" if self.arm == "bn" else f"{self.arm} {lam}"

    def layers(self) -> list[str]:
        return sorted(t.removeprefix("scale/angle/") for t in self.scalars
                      if t.startswith("scale/angle/"))

    def series(self, tag: str) -> tuple[np.ndarray, np.ndarray]:
        s = self.scalars.get(tag)
        if s is None:
            return np.array([]), np.array([])
        ok = np.isfinite(s.values)
        return s.steps[ok], s.values[ok]

    def late(self, tag: str) -> float | None:
        steps, values = self.series(tag)
        if not len(values):
            return None
        return float(values[steps >= steps[0] + LATE * (steps[-1] - steps[0])].mean())


def load(root: Path) -> list[Run]:
    runs = []
    for arm in ARMS:
        for mfile in sorted(root.glob(f"{arm}/*/metrics.json")):
            metrics = json.loads(mfile.read_text())
            if metrics.get("status") not in ("completed", "diverged"):
                continue
            parts = dict(p.split("=", 1) for p in mfile.parent.name.split(","))
            wd = parts["wd"]
            wd = wd if wd.startswith("exp") else f"{float(wd):g}"
            runs.append(Run(arm.removesuffix("_exp"), metrics["config"]["norm"], wd,
                            int(parts["seed"]), metrics,
                            read_events(mfile.parent, histograms=False).scalars))
    return runs


def check_controls(runs: list[Run]) -> None:
    """The norm-free sweeps run with every slot layer measured (study_scale.sh, ALL_SLOTS): fail
    loudly if a run measured fewer layers than the BN nets, i.e. the control was not there."""
    slots = max((r.layers() for r in runs if r.arm == "bn"), key=len, default=[])
    for r in runs:
        if r.arm != "bn" and r.layers() != slots:
            raise SystemExit(f"error: {r.label} seed {r.seed} measured {r.layers()}, not every "
                             f"slot layer {slots}: did ALL_SLOTS reach its probe?")


def base_lr(runs: list[Run], arm: str) -> float:
    return next(r.metrics["config"]["lr"] for r in runs if r.arm == arm and not r.exp)


def predicted(runs: list[Run], r: Run, momentum: float, wd_ref: float) -> float:
    lam = r.ref_wd if r.exp or r.ref_wd > 0 else wd_ref
    return math.sqrt(2 * base_lr(runs, r.arm) * lam / (1 + momentum))


def cell(values: list[float | None], fmt: str = ".3g") -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "–"
    text = f"{statistics.fmean(v):{fmt}}"
    return text + (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "")


def settings(runs: list[Run]) -> dict[str, list[Run]]:
    by = defaultdict(list)
    order = {a: i for i, a in enumerate(("bn", "sws", "none"))}
    for r in sorted(runs, key=lambda r: (order[r.arm], r.norm != "custom", r.exp,
                                         -r.ref_wd, r.seed)):
        by[r.label].append(r)
    return by


def table_angles(runs: list[Run], momentum: float, refs: dict[str, float]) -> None:
    layers = max((r.layers() for r in runs), key=len)
    print("Late angular update per step over the equilibrium sqrt(2ηλ/(1+α)) of the reference λ "
          "(own λ; exp lr: the λ it stands for; λ = 0: the arm's λ > 0), per layer, and how "
          "much ‖w‖ still moves over the late window (|change| %, mean over layers):")
    print()
    print("| setting | seeds | prediction (rad) | "
          + " | ".join(f"{layer}" for layer in layers) + " | ‖w‖ late |change| % |")
    print("|---" * (len(layers) + 4) + "|")
    for label, group in settings(runs).items():
        pred = predicted(runs, group[0], momentum, refs[group[0].arm])
        cells = [cell([(lambda a: None if a is None else a / pred)(r.late(f"scale/angle/{layer}"))
                       for r in group]) for layer in layers]
        drift = []
        for r in group:
            per_layer = []
            for layer in layers:
                steps, w = r.series(f"scale/weight_norm/{layer}")
                if len(w):
                    per_layer.append(100 * abs(w[-1] / w[np.searchsorted(
                        steps, steps[0] + LATE * (steps[-1] - steps[0]))] - 1))
            drift.append(statistics.fmean(per_layer) if per_layer else None)
        print(f"| {label} | {len(group)} | {pred:.3g} | " + " | ".join(cells)
              + f" | {cell(drift, '.2f')} |")


def table_sqrt_wd(runs: list[Run], wd: float, wd_big: float) -> None:
    """Late angle at WD_BIG over the late angle at WD, same seed, custom BN (sqrt(WD_BIG / WD)
    predicted)."""
    pairs = defaultdict(dict)
    for r in runs:
        if r.arm == "bn" and r.norm == "custom" and not r.exp and r.ref_wd in (wd, wd_big):
            pairs[r.seed][r.ref_wd] = r
    both = [p for p in pairs.values() if len(p) == 2]
    if not both:
        return
    layers = both[0][wd].layers()
    print()
    print(f"Custom BN, late angle at λ = {wd_big:g} over λ = {wd:g} (same seed; predicted "
          f"{math.sqrt(wd_big / wd):.3g}), per layer; and the same for the exponential-lr twins:")
    print()
    print("| pair | seeds | " + " | ".join(layers) + " |")
    print("|---" * (len(layers) + 2) + "|")
    for name, want_exp in (("λ > 0", False), ("exp lr", True)):
        ratios = defaultdict(list)
        n = 0
        for seed in pairs:
            twins = [r for r in runs if r.arm == "bn" and r.norm == "custom" and r.seed == seed
                     and r.exp == want_exp and r.ref_wd in (wd, wd_big)]
            by_wd = {r.ref_wd: r for r in twins}
            if len(by_wd) != 2:
                continue
            n += 1
            for layer in layers:
                a, b = (by_wd[w].late(f"scale/angle/{layer}") for w in (wd_big, wd))
                ratios[layer].append(None if a is None or b is None else a / b)
        if n:
            print(f"| {name} | {n} | " + " | ".join(cell(ratios[layer]) for layer in layers)
                  + " |")


def table_wd(runs: list[Run], refs: dict[str, float]) -> None:
    """(b): per arm, λ > 0 against λ = 0 at a constant lr and λ = 0 with the exponential lr."""
    print()
    print("What weight decay does: final test accuracy and training loss, and at the end of "
          "training the effective lr η/‖w‖² and the late angle of each measured layer, mean over "
          "layers (the BN nets' and the Scaled WS convs' are scale-invariant, the others not):")
    print()
    print("| setting | seeds | final test acc % | final train loss | final η/‖w‖² "
          "(conv layers) | late angle (rad, conv layers) | late angle (rad, hidden linear) |")
    print("|---" * 7 + "|")
    for label, group in settings(runs).items():
        if group[0].norm == "torch":
            continue
        convs = [x for x in group[0].layers() if x.startswith("features")]
        linear = [x for x in group[0].layers() if x.startswith("classifier")]
        eff = [statistics.fmean(r.series(f"scale/eff_lr/{x}")[1][-1] for x in convs)
               for r in group]
        ang_c = [statistics.fmean(r.late(f"scale/angle/{x}") for x in convs) for r in group]
        ang_l = [statistics.fmean(r.late(f"scale/angle/{x}") for x in linear) if linear else None
                 for r in group]
        print(f"| {label} | {len(group)} | "
              + cell([100 * r.metrics["final_test_acc"] for r in group], ".1f") + " | "
              + cell([r.metrics["final_train_loss"] for r in group]) + " | "
              + cell(eff) + " | " + cell(ang_c) + " | " + cell(ang_l) + " |")
    print()
    print("Paired by seed (same initial weights and batches): final test accuracy and training "
          "loss of λ = 0 (constant lr) and of λ = 0 with the exponential lr, minus those of the "
          "λ > 0 run (reference λ of the arm):")
    print()
    print("| arm | seeds | λ=0 const: Δ test acc | λ=0 const: Δ train loss "
          "| λ=0 exp lr: Δ test acc | λ=0 exp lr: Δ train loss |")
    print("|---" * 6 + "|")
    for arm, lam in refs.items():
        rows = defaultdict(dict)
        for r in runs:
            if r.arm == arm and r.norm != "torch" and r.ref_wd in (lam, 0):
                rows[r.seed]["exp" if r.exp else ("wd" if r.ref_wd else "zero")] = r
        cells = []
        for kind in ("zero", "exp"):
            pairs = [(p[kind], p["wd"]) for p in rows.values() if kind in p and "wd" in p]
            cells.append((len(pairs),
                          cell([100 * (a.metrics["final_test_acc"] - b.metrics["final_test_acc"])
                                for a, b in pairs], "+.1f"),
                          cell([a.metrics["final_train_loss"] - b.metrics["final_train_loss"]
                                for a, b in pairs], "+.3f")))
        seeds = "/".join(str(c[0]) for c in cells)
        print(f"| {arm} (λ={lam:g}) | {seeds} | {cells[0][1]} | {cells[0][2]} | {cells[1][1]} "
              f"| {cells[1][2]} |")


def smooth(x: np.ndarray, y: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    if len(y) <= k:
        return x, y
    return x[k // 2: len(y) - (k - 1 - k // 2)], np.convolve(y, np.ones(k) / k, mode="valid")


def figure_angle(runs: list[Run], momentum: float, refs: dict[str, float], out: Path) -> None:
    layers = max((r.layers() for r in runs), key=len)
    rows = (("BN nets", lambda r: r.arm == "bn" and not r.exp),
            ("norm-free nets (Scaled WS convs; no norm)", lambda r: r.arm != "bn" and not r.exp))
    fig = Figure(figsize=(3.6 * len(layers), 7))
    axes = fig.subplots(2, len(layers), squeeze=False, sharex=True)
    labels = list(settings(runs))
    for (title, keep), row in zip(rows, axes, strict=True):
        preds = set()
        for r in runs:
            if not keep(r):
                continue
            colour = f"C{labels.index(r.label) % 10}"
            for ax, layer in zip(row, layers, strict=True):
                x, y = smooth(*r.series(f"scale/angle/{layer}"))
                ax.plot(x, y, color=colour, linewidth=2.4 if r.norm == "custom" else 1.2,
                        linestyle="-" if r.seed == min(q.seed for q in runs) else ":",
                        label=f"{r.label} seed {r.seed}")
            if r.ref_wd > 0:  # runs of the same ηλ share one line
                preds.add(float(f"{predicted(runs, r, momentum, refs[r.arm]):.6g}"))
        for ax, layer in zip(row, layers, strict=True):
            for p in sorted(preds):
                ax.axhline(p, color="k", linestyle="--", linewidth=0.9)
                ax.annotate(f"√(2ηλ/(1+α)), ηλ={p * p * (1 + momentum) / 2:.2g}", (0.02, p),
                            xycoords=("axes fraction", "data"), fontsize="x-small", va="bottom")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{layer}", fontsize="medium")
        row[0].set_ylabel(f"{title}\nangle per step (rad)", fontsize="small")
        row[0].legend(fontsize="xx-small")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle("Angular update of each slot layer's weight against the equilibrium "
                 "(moving average over 5 probes)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def figure_wd(runs: list[Run], refs: dict[str, float], out: Path) -> None:
    arms = [a for a in ("bn", "sws", "none") if any(r.arm == a for r in runs)]
    fig = Figure(figsize=(15, 3.4 * len(arms)))
    axes = fig.subplots(len(arms), 4, squeeze=False)
    for arm, row in zip(arms, axes, strict=True):
        lam = refs[arm]
        for r in runs:
            if r.arm != arm or r.norm == "torch":
                continue
            kind = "exp" if r.exp else ("wd" if r.ref_wd else "zero")
            colour = {"wd": "C0", "zero": "C3", "exp": "C2"}[kind]
            style = "-" if r.ref_wd in (lam, 0) else "--"
            width = 2.0 if r.seed == min(q.seed for q in runs) else 0.9
            name = f"{r.label} seed {r.seed}"
            x, y = smooth(*r.series("train/loss"), k=9)
            row[0].plot(x, y, color=colour, linestyle=style, linewidth=width, label=name)
            acc = [100 * h["test_acc"] for h in r.metrics["history"]]
            row[1].plot(range(1, len(acc) + 1), acc, color=colour, linestyle=style,
                        linewidth=width, marker="o", markersize=3)
            conv = "features.4"
            row[2].plot(*r.series(f"scale/eff_lr/{conv}"), color=colour, linestyle=style,
                        linewidth=width)
            row[3].plot(*smooth(*r.series(f"scale/angle/{conv}")), color=colour, linestyle=style,
                        linewidth=width)
        for ax, title in zip(row, ("train loss", "test acc % per epoch",
                                   "η/‖w‖², features.4", "angle per step (rad), features.4"),
                             strict=True):
            ax.set_title(f"{arm}: {title}", fontsize="medium")
            ax.grid(True, alpha=0.3)
        row[2].set_yscale("log")
        row[3].set_yscale("log")
        row[0].legend(fontsize="xx-small")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[-1][1].set_xlabel("epoch")
    fig.suptitle("Weight decay λ > 0 (blue) vs λ = 0 at a constant lr (red) vs λ = 0 with "
                 "Li & Arora's exponential lr (green); dashed: the 4x λ pair")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main() -> None:
    root, out_dir, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    momentum, wd, wd_big, nf_wd = (float(x) for x in sys.argv[4:8])
    runs = load(root)
    if not runs:
        raise SystemExit(f"error: no finished runs under {root}")
    check_controls(runs)
    # A run that ended at chance accuracy has no angles left to compare (its weights stopped
    # moving); it would pull a setting's mean to zero, so it is named and left out.
    dead = [r for r in runs if r.metrics["final_train_acc"] < CHANCE]
    for r in dead:
        print(f"Left out: {r.label} seed {r.seed} (final train acc "
              f"{100 * r.metrics['final_train_acc']:.1f} %, test "
              f"{100 * r.metrics['final_test_acc']:.1f} %: trained to chance).")
    if dead:
        print()
    runs = [r for r in runs if r not in dead]
    refs = {arm: lam for arm, lam in (("bn", wd), ("sws", wd), ("none", nf_wd))
            if any(r.arm == arm for r in runs)}
    table_angles(runs, momentum, refs)
    table_sqrt_wd(runs, wd, wd_big)
    table_wd(runs, refs)
    figure_angle(runs, momentum, refs, out_dir / f"scale_angle{tag}.png")
    figure_wd(runs, refs, out_dir / f"scale_wd{tag}.png")


if __name__ == "__main__":
    main()
