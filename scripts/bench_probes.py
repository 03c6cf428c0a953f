"""Step time of ``bnlab train`` with ``probe=default`` vs ``probe=off``.

Both sides are ``bnlab.train.run(cfg)`` in this process, with the config ``bnlab train``
composes (``model=cnn norm=custom progress=false`` on the CIFAR-10 subset, everything else
default), differing only in ``probe``. What is timed is the span of bnlab's own
``images_per_s``: the training steps, with every probe call and the TensorBoard writing they
cause (``probe=default``: gradient norms and update ratios every step, activation statistics of
the fixed probe batch every 100 steps, histograms every 500); not the step-0
baseline measurement, evaluation or checkpoint. The CPU-clock figure times the same span
(``Trainer.fit`` minus ``Trainer.end_epoch``) in CPU seconds of this process.

Two measurements:

* step-interleaved (the precise one on a shared, noisy machine): one ``bnlab.train.Trainer``
  per side in this process, fed the same batches (bnlab's own ``train_batches``), alternating
  one training step of each side (``Trainer.train_step``, and ``Trainer.sync`` every
  ``log_every`` steps, as ``Trainer.fit`` does). Probes are read-only, so both sides compute on
  identical weights. Reported: total time of all steps with probes / without (this includes the
  periodic activation probe), and the median of the per-step ratios;
* whole runs: ``bnlab.train.run(cfg)`` per side, ``--epochs`` epochs (default 3: 234 steps of
  the subset, so the activation probe's cost at steps 100 and 200 is in, amortized as in a real
  run), its ``images_per_s``; rounds alternate the order of the sides; the ratio is the median
  over rounds of the per-step time with probes / without (drifts in the machine's load between
  the two runs of a round show up here). This one also charges each side for the work of its
  TensorBoard writer thread, which the step-interleaved measurement spreads over both sides.

A third, ``--per-probe``, prices each probe of the fixed probe batch on its own: one trainer
(``probe=off``) alternates a training step with one call of each kind, each kind with its own
``Probes`` on the same model (the bare probe forward; activations, whiteness, statistics
mismatch alone; all three), in CPU seconds of this process (``time.process_time``: steadier
than wall time on a shared machine). A measurement's own cost is its time less the bare
forward's (due together, they share one forward); over the median step and the interval, it is
its share of each step.

Target: probe=default at most 1.10× the step time of probe=off.

Usage::

    python scripts/bench_probes.py              # 3 epochs of the 10k subset, 3 rounds
    python scripts/bench_probes.py --quick      # 2560 images, 2 rounds
    python scripts/bench_probes.py --full       # also probe=full (ICS and landscape on)
    python scripts/bench_probes.py --per-probe --threads 1   # each probe-batch measurement
    python scripts/bench_probes.py --signal-probes --threads 1   # gram/ and scale/ at full
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (
    BATCH,
    DEFAULT_ROOT,
    Sample,
    bnlab_epoch,
    bnlab_overrides,
    compose,
    restore_torch_globals,
)

from bnlab import data as datasets
from bnlab import train
from bnlab.models import find_slots
from bnlab.probes import Probes
from bnlab.probes.forward import probe_forward
from bnlab.probes.readonly import PROBE_SEED
from bnlab.tracking import Tracker

# The probe-batch measurements --per-probe prices (probe.* intervals set to 1 in each), besides
# the bare probe forward.
PROBE_KINDS = {"act": ("act_every",), "white": ("white_every",),
               "bnstats": ("bnstats_every",),
               "act+white+bnstats": ("act_every", "white_every", "bnstats_every")}


def override(base: list[str], *overrides: str) -> list[str]:
    """``base`` with each ``key=value`` of ``overrides`` in place of the entry with that key."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + list(overrides)


def step_interleaved(base: list[str], configs: dict[str, list[str]], epochs: int,
                     run_dir: Path) -> dict[str, list[float]]:
    """Seconds of each training step per side (a name and its overrides of ``base``), the
    sides' steps alternating on the same batch."""
    sides = {}
    probes = list(configs)
    with restore_torch_globals():
        for probe, overrides in configs.items():
            folder = run_dir / probe.replace(" ", "_")
            trainer = train.Trainer(compose(override(base, *overrides)), folder)
            tracker = Tracker(folder)
            if trainer.probes:
                trainer.record(tracker, trainer.probes.start(), 0)
            sides[probe] = (trainer, tracker)
        trainer = sides[probes[0]][0]
        cfg, d = trainer.cfg, trainer.data
        times: dict[str, list[float]] = {p: [] for p in probes}
        for epoch in range(epochs):
            batches = datasets.train_batches(d, cfg.batch_size, cfg.seed, epoch, 0,
                                             epoch * trainer.per_epoch, cfg.data.augment)
            for i, (x, y) in enumerate(batches):
                for probe in probes if i % 2 == 0 else probes[::-1]:
                    tr, tk = sides[probe]
                    t0 = time.perf_counter()
                    tr.train_step(x, y, tk)
                    if tr.state.step % cfg.log_every == 0:
                        tr.sync(tk)
                    times[probe].append(time.perf_counter() - t0)
        for _, tk in sides.values():
            tk.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2560 images, 2 rounds")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--norm", default="custom")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default)")
    parser.add_argument("--full", action="store_true", help="also time probe=full")
    parser.add_argument("--signal-probes", action="store_true",
                        help="time probe=full against probe=full without gram/ and scale/ "
                        "(step-interleaved): their cost at probe=full's intervals")
    parser.add_argument("--per-probe", action="store_true",
                        help="only price each probe of the probe batch (act, white, bnstats)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--only", choices=["steps", "epochs"], default=None,
                        help="run only the step-interleaved or only the whole-run part")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each whole run (default 3; --quick 1)")
    args = parser.parse_args()
    n = args.train_size or (20 * BATCH if args.quick else None)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    probes = ["off", "default", *(["full"] if args.full else [])]
    base = override(bnlab_overrides(args.data_root, args.norm, args.threads, n),
                    f"model={args.model}")
    run_dir = Path(tempfile.mkdtemp(prefix="bench_probes_"))
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}; model={args.model} norm={args.norm}, "
          f"{'all' if n is None else n} training images, {rounds} rounds")

    if args.per_probe:
        per_probe_part(base, 3 + 2 * rounds, run_dir)
        return
    if args.signal_probes:
        without = "full without gram, scale"
        step_part(base, {without: ["probe=full", "probe.gram_every=0", "probe.scale_every=0"],
                         "full": ["probe=full"]}, 3 if args.quick else 2, run_dir, without)
        return
    if args.only != "epochs":  # 3 epochs: past step 50 (act probe)
        step_part(base, {p: [f"probe={p}"] for p in probes}, 3 if args.quick else 2, run_dir)
    if args.only != "steps":
        epoch_part(base, probes, rounds, args.epochs or (1 if args.quick else 3), run_dir)


def step_part(base: list[str], configs: dict[str, list[str]], epochs: int, run_dir: Path,
              baseline: str = "off") -> None:
    times = step_interleaved(base, configs, epochs, run_dir)
    steps = len(times[baseline])
    print(f"\n## step-interleaved: {steps} steps ({epochs} epoch(s)) per side")
    print(f"| probe | mean step ms | total / probe={baseline} | median per-step ratio |")
    print("|---|---|---|---|")
    for probe, ts in times.items():
        total = sum(ts) / sum(times[baseline])
        per_step = statistics.median(t / o for t, o in zip(ts, times[baseline], strict=True))
        print(f"| {probe} | {1e3 * sum(ts) / steps:.1f} | {total:.3f}× | {per_step:.3f}× |")



def per_probe_part(base: list[str], rounds: int, run_dir: Path) -> None:
    with restore_torch_globals():
        trainer = train.Trainer(compose(base), run_dir / "per_probe")
        tracker = Tracker(run_dir / "per_probe")
        cfg, model = trainer.cfg, trainer.model
        default = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "probe"
                                 / "default.yaml")
        off = {key: 0 for key in ("act_every", "hist_every", "grad_every", "white_every",
                                  "bnstats_every")}
        batch = datasets.probe_batch(trainer.data, default.batch_size)
        calls: dict[str, Callable[[], object]] = {
            "forward": lambda: probe_forward(model, batch[0], PROBE_SEED, [])}
        for kind, keys in PROBE_KINDS.items():
            probes = Probes(OmegaConf.merge(default, off, dict.fromkeys(keys, 1)), model,
                            trainer.optimizer, F.cross_entropy, batch, find_slots(model))
            probes.start()  # the drift references: later probes do the full work
            calls[kind] = functools.partial(probes.after_step, 1)
        times: dict[str, list[float]] = {"step": [], **{kind: [] for kind in calls}}
        x, y = next(datasets.train_batches(trainer.data, cfg.batch_size, cfg.seed, 0, 0, 0,
                                           cfg.data.augment))
        trainer.train_step(x, y, tracker)  # warm-up
        for _ in range(rounds):
            for kind, call in calls.items():
                t0 = time.process_time()
                trainer.train_step(x, y, tracker)
                t1 = time.process_time()
                call()
                t2 = time.process_time()
                times["step"].append(t1 - t0)
                times[kind].append(t2 - t1)
        tracker.close()
    ms = {kind: 1e3 * statistics.median(ts) for kind, ts in times.items()}
    step = ms["step"]
    print(f"\n## per probe: CPU ms (median of {rounds}), in training steps, and the share of "
          "each step at an interval of 100 and 500 (the measurement's own cost: without the "
          "probe forward, which they share)")
    print("| measurement | CPU ms | training steps | own cost, steps | every 100 | every 500 |")
    print("|---|---|---|---|---|---|")
    for kind, value in ms.items():
        own = (value - ms["forward"]) / step if kind in PROBE_KINDS else None
        shares = ("", "", "") if own is None else (f"{own:.2f}", f"{own / 100:.2%}",
                                                  f"{own / 500:.2%}")
        print(f"| {kind} | {value:.0f} | {value / step:.2f} | {' | '.join(shares)} |")


def epoch_part(base: list[str], probes: list[str], rounds: int, epochs: int,
               run_dir: Path) -> None:
    print(f"\nwhole runs of {epochs} epoch(s): warm-up …", flush=True)
    for probe in probes:
        bnlab_epoch(override(base, f"probe={probe}", f"data.train_size={8 * BATCH}"), run_dir)

    samples: dict[str, list[Sample]] = {p: [] for p in probes}
    for r in range(rounds):
        for probe in probes if r % 2 == 0 else probes[::-1]:
            samples[probe].append(bnlab_epoch(override(base, f"probe={probe}", f"epochs={epochs}"),
                                              run_dir))
        print(f"round {r + 1}: " + "  ".join(
            f"probe={p} {v[-1].wall_ips:.0f}/{v[-1].cpu_ips:.0f} img/s (wall/CPU)"
            for p, v in samples.items()), flush=True)

    print(f"\n## whole runs of {epochs} epoch(s)")
    print("| probe | images/s wall (median) | per round | step time / probe=off, wall | "
          "step time / probe=off, CPU |")
    print("|---|---|---|---|---|")
    off = samples["off"]
    for probe, xs in samples.items():
        wall = statistics.median([o.wall_ips / x.wall_ips for o, x in zip(off, xs, strict=True)])
        cpu = statistics.median([o.cpu_ips / x.cpu_ips for o, x in zip(off, xs, strict=True)])
        print(f"| {probe} | {statistics.median(x.wall_ips for x in xs):.0f} | "
              f"{', '.join(f'{x.wall_ips:.0f}' for x in xs)} | {wall:.3f}× | {cpu:.3f}× |")


if __name__ == "__main__":
    main()
