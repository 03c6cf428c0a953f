"""Benchmark ``bnlab train`` throughput against hand-written PyTorch loops, and its memory.

Sides, each training the same model (``model=cnn``, ``norm=custom`` unless ``--norm``) for one
epoch of the training set from a fresh initialization, batch 128, SGD with bnlab's default
lr, momentum and weight decay (read from the composed config), cosine lr per step, random crop
(4-pixel zero padding) + horizontal flip, in one memory format (``--memory-format``; default
``channels_last``, what bnlab's ``channels_last=auto`` picks on CPU: bnlab gets
``channels_last=true``, the hand-written sides convert their model and each batch):

* ``bnlab``:  ``bnlab.train.run(cfg)`` in this process, with the config ``bnlab train`` composes
  (``initialize_config_module("bnlab.configs")``; ``probe=off epochs=1 progress=false``, all
  other keys their defaults, so ``deterministic=true``). Its throughput is ``images_per_s`` from
  ``metrics.json``: training steps over the epoch (batch cutting, augmentation, forward,
  backward, optimizer step, lr setting, loss buffering, the host sync every ``log_every`` steps,
  TensorBoard scalars); the evaluation, checkpoint and data loading at start are not in it.
* ``bare``:   a hand-written loop on pre-loaded uint8 tensors (read with plain ``pickle``), the
  dataset padded once, each batch cropped and flipped with one gather, normalized in place;
  ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped per batch; the loss summed on the
  device and read once at the end (torch defaults: no deterministic mode).
* ``bare-nchw`` (with ``channels_last`` only): ``bare`` in NCHW, what the layout is worth;
* ``loader-wN``: ``torchvision.datasets.CIFAR10`` (PIL images) +
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` through a
  ``DataLoader`` with ``N`` worker processes, feeding the same loop as ``bare``.

Bare and loader sides time the whole epoch (shuffle, batches, steps, the final sync). All sides
run in this process with the same torch thread count; bnlab's global torch settings
(deterministic mode) are undone after each of its runs. Each round runs every side once, in a
rotating order; the report gives the median images/s per side and the median of the per-round
ratios. A second table times the data path alone (one epoch of batches, no model).

bnlab sets up glibc malloc (no mmap, a high trim threshold) when a run starts
(``keep_freed_memory`` in ``bnlab/runtime.py``); that is process-wide, so after bnlab's warm-up
run every side here runs with it and the table compares the loops and data paths alone. What
the setting itself buys is measured in fresh ``bnlab train`` processes, with it and with
glibc's defaults (``GLIBC_TUNABLES=glibc.malloc.tcache_count=7``, a default value, makes bnlab
leave malloc as it is): a hand-written loop in a fresh process runs with glibc's defaults.

Memory (fresh subprocesses): peak RSS of ``bnlab train model=cnn probe=off epochs=1``
(``peak_rss_mb`` from ``metrics.json``: VmHWM), on the data and, except with ``--quick``, on a
synthetic full-size CIFAR-10 (50k train / 10k test random images written in the
``cifar-10-batches-py`` layout, read through the same code path); and the resident memory
``bnlab.data.load`` adds (held after it returns, and at its peak), for both.

``--compare-norm torch`` adds the same ``bnlab`` run with ``norm=torch`` as a side (the step
time of the default command against the native BN), ``--bnlab-only`` drops the hand-written
loops and the allocator part.

Usage::

    python scripts/bench_train.py            # 3 rounds, loaders with 0 and 2 workers
    python scripts/bench_train.py --quick    # 2560 training images, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bnlab import train  # noqa: E402
from bnlab.models import build_model, norm_factory  # noqa: E402
from bnlab.runtime import setup_process  # noqa: E402

DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-subset"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
BATCH = 128
SGD: dict = {}  # lr, momentum, weight_decay: filled from bnlab's composed optim config

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


# -- bnlab ---------------------------------------------------------------------------------------


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("bnlab.configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def bnlab_overrides(root: Path, norm: str, threads: int | None,
                    train_size: int | None) -> list[str]:
    size = "null" if train_size is None else str(train_size)
    return [f"data.root={root}", "model=cnn", f"norm={norm}", "probe=off", "epochs=1",
            "progress=false", "overwrite=true", f"threads={threads or 'null'}",
            f"data.train_size={size}"]


@contextlib.contextmanager
def restore_torch_globals() -> Iterator[None]:
    """``bnlab train`` sets process-wide torch flags (``bnlab.runtime.setup_process``, which the
    bnlab sides call as the CLI does); put torch's defaults back for the other sides."""
    from torch.utils import deterministic

    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             deterministic.fill_uninitialized_memory, torch.get_num_threads())
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        deterministic.fill_uninitialized_memory = saved[2]
        torch.set_num_threads(saved[3])


@dataclass
class Clock:
    """Wall and CPU seconds (this process and its reaped children: DataLoader workers)."""

    wall: float = 0.0
    cpu: float = 0.0

    @staticmethod
    def now() -> Clock:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return Clock(time.perf_counter(), time.process_time() + kids.ru_utime + kids.ru_stime)

    def __sub__(self, other: Clock) -> Clock:
        return Clock(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: Clock) -> Clock:
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


@dataclass
class Sample:
    """One epoch of one side: images per wall second and per CPU second."""

    wall_ips: float
    cpu_ips: float


@contextlib.contextmanager
def clocked(cls: type, name: str, total: list[Clock]) -> Iterator[None]:
    """Add the wall/CPU time spent in ``cls.name`` to ``total[0]`` while active."""
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        t0 = Clock.now()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] = total[0] + (Clock.now() - t0)

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, original)


def bnlab_epoch(overrides: list[str], run_dir: Path) -> Sample:
    """One ``train.run``; wall throughput is its own ``images_per_s``. The CPU figure times the
    same span: ``Trainer.fit`` minus ``Trainer.end_epoch`` (evaluation)."""
    cfg = compose(overrides)
    fit, end = [Clock()], [Clock()]
    with restore_torch_globals(), clocked(train.Trainer, "fit", fit), \
            clocked(train.Trainer, "end_epoch", end):
        setup_process(cfg)
        metrics = train.run(cfg, run_dir)
    images = metrics["steps"] * cfg.batch_size
    return Sample(float(metrics["images_per_s"]), images / (fit[0] - end[0]).cpu)


# -- data for the hand-written sides -------------------------------------------------------------


def read_cifar(root: Path, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 32, 32) images and int64 labels of the training files, with plain pickle."""
    folder = root / FOLDER if (root / FOLDER).is_dir() else root
    images, labels = [], []
    for name in TRAIN_FILES:
        with (folder / name).open("rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(batch["data"])
        labels += batch["labels"]
    x = torch.from_numpy(np.concatenate(images).reshape(-1, 3, 32, 32))
    y = torch.tensor(labels)
    return (x, y) if n is None else (x[:n].clone(), y[:n].clone())


def mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    pixels = images.double() / 255
    return pixels.mean(dim=(0, 2, 3)).tolist(), pixels.std(dim=(0, 2, 3)).tolist()


class TensorBatches:
    """The hand-written on-tensor data path: the dataset is padded once; per batch, one gather
    picks each image's rows and one its columns (reversed for a flip); normalized in place."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: list[float],
                 std: list[float], seed: int = 0) -> None:
        self.padded = F.pad(images, (4, 4, 4, 4))
        self.labels = labels
        self.shift = torch.tensor(mean).mul(255).view(1, 3, 1, 1)
        self.scale = torch.tensor(std).mul(255).reciprocal().view(1, 3, 1, 1)
        self.gen = torch.Generator().manual_seed(seed)
        self.ar = torch.arange(32)

    def __len__(self) -> int:
        return len(self.labels) // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.labels), generator=self.gen)
        n = BATCH
        for i in range(len(self)):
            idx = order[i * n:(i + 1) * n]
            dy, dx = torch.randint(0, 9, (2, n), generator=self.gen)
            flip = torch.rand(n, generator=self.gen) < 0.5
            rows = (dy[:, None] + self.ar).view(n, 1, 32, 1).expand(n, 3, 32, 40)
            cols = dx[:, None] + torch.where(flip[:, None], self.ar.flip(0), self.ar)
            x = self.padded[idx].gather(2, rows).gather(3, cols.view(n, 1, 1, 32).expand(
                n, 3, 32, 32))
            yield x.float().sub_(self.shift).mul_(self.scale), self.labels[idx]


class CIFAR10Folder:
    """torchvision's CIFAR10 for a folder without the official checksums (e.g. a subset)."""

    @staticmethod
    def make(root: Path, n: int | None, transform: Callable) -> torch.utils.data.Dataset:
        from torchvision.datasets import CIFAR10

        class Unchecked(CIFAR10):
            def _check_integrity(self) -> bool:
                return True

            def _load_meta(self) -> None:
                self.classes = [str(i) for i in range(10)]

        folder = root if (root / FOLDER).is_dir() else root.parent
        ds = Unchecked(str(folder), train=True, transform=transform)
        if n is not None:
            ds.data, ds.targets = ds.data[:n], ds.targets[:n]
        return ds


def pil_loader(root: Path, n: int | None, mean: list[float], std: list[float],
               workers: int) -> torch.utils.data.DataLoader:
    from torchvision import transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    dataset = CIFAR10Folder.make(root, n, transform)
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True,
                                       num_workers=workers)


# -- the hand-written loop -----------------------------------------------------------------------


def make_model(model: str, norm: str, fmt: torch.memory_format, seed: int = 0,
               noise: dict | None = None) -> nn.Module:
    """A freshly initialized bnlab model in layout ``fmt`` (the seed fixes its weights)."""
    torch.manual_seed(seed)
    norm_option = norm_factory(norm, **({"noise": noise} if noise else {}))
    return build_model(model, norm_option, init="kaiming").to(
        memory_format=fmt)


def bare_epoch(model: nn.Module, batches: Batches, steps: int, fmt: torch.memory_format
               ) -> Sample:
    """One epoch of the plain loop, timed whole (shuffle to the final sync); batches are put in
    ``fmt``, the model's memory format."""
    opt = torch.optim.SGD(model.parameters(), **SGD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    t0 = Clock.now()
    total, seen = torch.zeros(()), 0
    for x, y in batches:
        loss = F.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.detach()
        seen += len(y)
    total.item()
    dt = Clock.now() - t0
    return Sample(seen / dt.wall, seen / dt.cpu)


def data_only(batches: Batches) -> Sample:
    t0 = Clock.now()
    n = sum(len(y) for _, y in batches)
    dt = Clock.now() - t0
    return Sample(n / dt.wall, n / dt.cpu)


# -- memory (subprocesses) -----------------------------------------------------------------------


def status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process; unlike ``ru_maxrss``, VmHWM does
    not count the parent's memory at fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(root: str) -> None:
    """Runs in a fresh interpreter: the RSS that bnlab.data.load adds (held, and at its peak)."""
    from omegaconf import OmegaConf

    from bnlab import data

    cfg = OmegaConf.create({"name": "cifar10", "root": root, "download": False, "url": None,
                            "md5": None, "train_size": None, "test_size": None})
    before = status_mb("VmRSS")
    d = data.load(cfg, torch.device("cpu"))
    after, peak = status_mb("VmRSS"), status_mb("VmHWM")
    tensors = sum(t.numel() * t.element_size()
                  for t in (d.train.images, d.train.labels, d.test.images, d.test.labels)) / 2**20
    print(json.dumps({"train": len(d.train), "test": len(d.test), "tensors_mb": tensors,
                      "held_mb": after - before, "peak_extra_mb": peak - before}))


def write_synthetic_cifar(folder: Path, train: int, test: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    files = [(name, train // 5) for name in TRAIN_FILES] + [("test_batch", test)]
    for name, n in files:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n)]}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=4)


def dataset_memory(root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(root)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cli_metrics(root: Path, train_size: int | None, env: dict[str, str] | None = None) -> dict:
    """``metrics.json`` of ``bnlab train model=cnn probe=off epochs=1`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        size = "null" if train_size is None else str(train_size)
        cmd = [sys.executable, "-m", "bnlab.cli", "train", f"data.root={root}", "model=cnn",
               "probe=off", "epochs=1", "progress=false", f"data.train_size={size}",
               f"hydra.run.dir={tmp}/run"]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **(env or {})})
        return json.loads((Path(tmp) / "run" / "metrics.json").read_text())


DEFAULT_MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}  # a default: bnlab keeps off


def report_allocator(root: Path, train_size: int | None, rounds: int) -> None:
    """``bnlab train`` in fresh processes, with bnlab's malloc settings and with glibc's."""
    ips: dict[str, list[float]] = {"bnlab malloc settings": [], "glibc defaults": []}
    envs = {"bnlab malloc settings": {}, "glibc defaults": DEFAULT_MALLOC}
    for r in range(rounds):
        for name in list(ips) if r % 2 == 0 else list(ips)[::-1]:
            ips[name].append(cli_metrics(root, train_size, envs[name])["images_per_s"])
    print("\n## allocator: `bnlab train model=cnn probe=off epochs=1`, fresh processes")
    print("| malloc | images/s (median) | per round | tuned / this |")
    print("|---|---|---|---|")
    tuned = ips["bnlab malloc settings"]
    for name, xs in ips.items():
        ratio = median([t / x for t, x in zip(tuned, xs, strict=True)])
        print(f"| {name} | {median(xs):.0f} | {', '.join(f'{x:.0f}' for x in xs)} | "
              f"{ratio:.3f}× |")


def report_memory(root: Path, train_size: int | None, full_run: bool) -> None:
    print("\n## memory")
    print(f"peak RSS of `bnlab train model=cnn probe=off epochs=1` (train_size={train_size}): "
          f"{cli_metrics(root, train_size)['peak_rss_mb']:.0f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp) / FOLDER
        write_synthetic_cifar(fake, 50_000, 10_000)
        rows = [("real subset", dataset_memory(root)),
                ("synthetic full size", dataset_memory(fake))]
        if full_run:
            print("peak RSS of the same run on the synthetic full-size set (50k / 10k): "
                  f"{cli_metrics(fake, None)['peak_rss_mb']:.0f} MB")
    print("| dataset | train | test | tensors MB | RSS held MB | RSS peak extra MB |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['train']} | {m['test']} | {m['tensors_mb']:.0f} | "
              f"{m['held_mb']:.0f} | {m['peak_extra_mb']:.0f} |")


# -- main ----------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def print_table(samples: dict[str, list[Sample]], ref: str) -> None:
    """Per side: median images/s by wall and by CPU clock, and bnlab / side for each clock as
    the median of per-round ratios (rounds pair sides run close together in time)."""
    print("| side | images/s wall (median) | per round | bnlab / side, wall | "
          "images per CPU-s (median) | bnlab / side, CPU |")
    print("|---|---|---|---|---|---|")
    for name, xs in samples.items():
        wall = [x.wall_ips for x in xs]
        cpu = [x.cpu_ips for x in xs]
        r_wall = median([b.wall_ips / x.wall_ips for b, x in zip(samples[ref], xs, strict=True)])
        r_cpu = median([b.cpu_ips / x.cpu_ips for b, x in zip(samples[ref], xs, strict=True)])
        print(f"| {name} | {median(wall):.0f} | {', '.join(f'{v:.0f}' for v in wall)} | "
              f"{r_wall:.3f}× | {median(cpu):.0f} | {r_cpu:.3f}× |")


def bench_throughput(args: argparse.Namespace, n: int | None) -> None:
    images, labels = read_cifar(args.data_root, n)
    mean, std = mean_std(images)
    steps = len(labels) // BATCH
    tensors = TensorBatches(images, labels, mean, std)
    loaders = {f"loader-w{w}": pil_loader(args.data_root, n, mean, std, w) for w in args.workers}
    nhwc = args.memory_format == "channels_last"
    fmt = FORMATS[args.memory_format]
    overrides = [f"channels_last={str(nhwc).lower()}",
                 *bnlab_overrides(args.data_root, args.norm, args.threads, n)]
    optim = compose(overrides).optim
    SGD.update(lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_train_"))

    sides: dict[str, Callable[[], Sample]] = {"bnlab": lambda: bnlab_epoch(overrides, run_dir)}
    for norm in args.compare_norm:  # the same command with another norm
        other = [o if not o.startswith("norm=") else f"norm={norm}" for o in overrides]
        sides[f"bnlab norm={norm}"] = lambda other=other: bnlab_epoch(other, run_dir)
    if not args.bnlab_only:
        sides["bare"] = lambda: bare_epoch(make_model("cnn", args.norm, fmt), tensors, steps, fmt)
    if nhwc and not args.bnlab_only:  # what the layout alone is worth
        nchw = torch.contiguous_format
        sides["bare-nchw"] = lambda: bare_epoch(make_model("cnn", args.norm, nchw), tensors, steps,
                                                nchw)
    for name, loader in loaders.items():
        sides[name] = lambda loader=loader: bare_epoch(make_model("cnn", args.norm, fmt), loader,
                                                       steps, fmt)

    print("warm-up: bnlab and bare loop on 8 batches …", flush=True)
    bnlab_epoch([*overrides[:-1], f"data.train_size={8 * BATCH}"], run_dir)
    bare_epoch(make_model("cnn", args.norm, fmt), list(tensors)[:8], 8, fmt)

    samples: dict[str, list[Sample]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(sides[name]())
        print(f"round {r + 1} (order {', '.join(order)}): " + "  ".join(
            f"{k} {v[-1].wall_ips:.0f}/{v[-1].cpu_ips:.0f}" for k, v in samples.items()),
            flush=True)

    print(f"\n## throughput: one epoch, {steps} steps × {BATCH} images, model=cnn "
          f"norm={args.norm}, {args.memory_format}, {args.rounds} rounds")
    print_table(samples, "bnlab")

    bnlab_data = BnlabBatches(overrides)
    data_sides: dict[str, Callable[[], Batches]] = {
        "bnlab": bnlab_data.epoch,
        "bare": lambda: tensors,
        **{name: (lambda loader=loader: loader) for name, loader in loaders.items()},
    }
    dps: dict[str, list[Sample]] = {name: [] for name in data_sides}
    for _ in range(args.rounds):
        for name, make in data_sides.items():
            dps[name].append(data_only(make()))
    print(f"\n## data path alone: one epoch of augmented, normalized batches, no model, "
          f"{args.rounds} rounds")
    print_table(dps, "bnlab")


class BnlabBatches:
    """bnlab's own batch generator (``bnlab.data.train_batches``) over its loaded dataset."""

    def __init__(self, overrides: list[str]) -> None:
        from bnlab import data

        self.cfg = compose(overrides)
        self.data = data.load(self.cfg.data, torch.device("cpu"), self.cfg.seed)

    def epoch(self) -> Batches:
        from bnlab import data

        cfg = self.cfg
        return data.train_batches(self.data, cfg.batch_size, cfg.seed, 0, 0, 0, cfg.data.augment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2560 images, 2 rounds")
    parser.add_argument("--train-size", type=int, default=None,
                        help="use the first N training images (default: all)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--norm", default="custom", help="custom, torch, none or noisy")
    parser.add_argument("--memory-format", choices=list(FORMATS),
                        default="channels_last",
                        help="layout of every side (bnlab: channels_last=true/false; default: "
                             "what bnlab's channels_last=auto picks on CPU)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",") if w],
                        default=None, help="DataLoader worker counts, e.g. 0,2 (empty: none)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every side (default: torch's default)")
    parser.add_argument("--compare-norm", action="append", default=[],
                        help="add a side: the bnlab run with this norm instead (repeatable); "
                             "'bnlab / side' is then that norm's step time over --norm's")
    parser.add_argument("--bnlab-only", action="store_true",
                        help="no hand-written loop sides (bare, bare-nchw), no allocator part")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    n = args.train_size or (20 * BATCH if args.quick else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.workers = args.workers if args.workers is not None else ([0] if args.quick else [0, 2])
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, data {args.data_root}")
    if not args.memory_only:
        bench_throughput(args, n)
        if not args.bnlab_only:
            report_allocator(args.data_root, n, args.rounds)
    if not args.no_memory:
        report_memory(args.data_root, n, full_run=not args.quick)


if __name__ == "__main__":
    main()
