"""Wall time of a 4-job sweep: Hydra's joblib launcher (2 jobs at once) vs one job after another.

Both sides run the same command as a user would, in a subprocess, and the wall time of the
whole command is taken (Python start-up, Hydra, every job's data loading, training, evaluation
and outputs, the launcher's own start-up):

* ``sequential``: ``bnlab train -m ... seed=0,1,2,3`` (Hydra's basic launcher; each job uses
  torch's default thread count, all cores);
* ``parallel``:   the same plus ``hydra/launcher=parallel hydra.launcher.n_jobs=2`` (joblib's
  loky processes; ``threads`` is null, so the CLI gives each job cores / n_jobs threads);
* ``parallel-oversubscribed`` (``--oversubscribed``): parallel with ``threads=<cores>`` forced,
  to show what the per-job thread split buys.

Rounds alternate the order of the sides; the speed-up is the median over rounds of sequential
wall time / parallel wall time for the same round.

Usage::

    python scripts/bench_sweep.py             # jobs of 5000 training images, 2 rounds
    python scripts/bench_sweep.py --quick     # jobs of 1280 images, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-subset"


def sweep_command(root: Path, train_size: int, sweep_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "bnlab.cli", "train", "-m", f"data.root={root}",
            f"data.train_size={train_size}", "data.test_size=1000", "model=cnn", "probe=off",
            "epochs=1", "progress=false", "seed=0,1,2,3", f"hydra.sweep.dir={sweep_dir}", *extra]


OVERRIDES: list[str] = []  # --override: extra overrides for every side (e.g. batch_size=32)


SIDES = {
    "sequential": [],
    "parallel": ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"],
    "parallel-oversubscribed": ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                                f"threads={os.cpu_count()}"],
}


def run_sweep(root: Path, train_size: int, extra: list[str]) -> tuple[float, list[float]]:
    """Wall seconds of the whole sweep command, and each job's images/s (from metrics.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp) / "sweep"
        env = {**os.environ, "CI": "1"}
        t0 = time.perf_counter()
        cmd = sweep_command(root, train_size, sweep_dir, [*OVERRIDES, *extra])
        proc = subprocess.run(cmd, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        jobs = sorted(sweep_dir.glob("*/metrics.json"))
        if len(jobs) != 4:
            raise SystemExit(f"expected 4 job dirs under {sweep_dir}, found {len(jobs)}")
        ips = [json.loads(p.read_text())["images_per_s"] for p in jobs]
    return wall, ips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1280 images per job, 1 round")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--oversubscribed", action="store_true",
                        help="also time parallel jobs that each use every core")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra override for every job, e.g. batch_size=32 (repeatable)")
    args = parser.parse_args()
    OVERRIDES.extend(args.override)
    size = args.train_size or (1280 if args.quick else 5000)
    rounds = args.rounds or (1 if args.quick else 2)
    sides = [s for s in SIDES if args.oversubscribed or s != "parallel-oversubscribed"]

    print(f"{os.cpu_count()} cores; 4 jobs (seed=0,1,2,3) of model=cnn norm=custom probe=off "
          f"{' '.join(OVERRIDES)}, 1 epoch of {size} training images + evaluation on 1000; "
          f"{rounds} round(s)")
    walls: dict[str, list[float]] = {s: [] for s in sides}
    job_ips: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            wall, ips = run_sweep(args.data_root, size, SIDES[side])
            walls[side].append(wall)
            job_ips[side] += ips
            print(f"round {r + 1}: {side} {wall:.1f} s (jobs' images/s: "
                  f"{', '.join(f'{v:.0f}' for v in ips)})", flush=True)

    print("\n| launcher | wall s (median) | per round | sequential / side | "
          "per-job images/s (median) |")
    print("|---|---|---|---|---|")
    for side in sides:
        ratio = statistics.median(
            [s / p for s, p in zip(walls["sequential"], walls[side], strict=True)])
        print(f"| {side} | {statistics.median(walls[side]):.1f} | "
              f"{', '.join(f'{w:.1f}' for w in walls[side])} | {ratio:.2f}× | "
              f"{statistics.median(job_ips[side]):.0f} |")


if __name__ == "__main__":
    main()
