"""CIFAR-10: finding, downloading, verifying and reading it; the on-device batch loader.

The whole dataset is held as uint8 tensors on the training device (as in Keller Jordan's
cifar10-airbench): batches are cut, augmented and normalized there, so no worker processes or
host-to-device copies sit in the training step.

Randomness is *stateless*: the order of epoch ``e`` and the augmentation of global step ``s`` come
from generators seeded with ``(seed, e)`` and ``(seed, s)``. A run resumed at any step therefore
sees exactly the batches the uninterrupted run would have seen, with no generator state to save.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from bnlab.errors import UsageError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
PIXELS = 3 * 32 * 32


@dataclass
class Split:
    images: torch.Tensor  # uint8, (N, 3, 32, 32)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    train: Split
    test: Split
    mean: torch.Tensor  # float32 (3,), per channel, on the [0, 1] scale, from the training split
    std: torch.Tensor


# -- safe reading of the python-pickle layout ------------------------------------------------


class _Refused(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch file is made of: dicts, lists, strings, numbers and numpy
    arrays. A crafted pickle naming any other callable (``os.system`` …) is refused before it
    runs, where ``pickle.load`` would run it."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    })

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = module.replace("numpy.core.", "numpy._core.")  # numpy 2 moved (and warns)
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (uint8 images (N, 3, 32, 32), int64 labels). Reads the official Python-2
    pickles (``latin1`` decodes their byte strings) and Python-3 re-packed copies alike."""
    hint = "re-create the dataset or set data.download=true to fetch the official archive"
    if not path.is_file():
        raise UsageError(f"CIFAR-10 file missing: {path} ({hint})")
    try:
        with path.open("rb") as f:
            raw = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise UsageError(f"{path} is not a CIFAR-10 batch file: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError) as e:
        raise UsageError(f"{path} is truncated or not a pickle ({e}); {hint}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a {type(raw).__name__}, not a CIFAR-10 batch dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    data, labels = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", None)
        raise UsageError(f"{path}: 'data' must be an array of shape (N, {PIXELS}), got {shape}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise UsageError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise UsageError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32), labels


def _read_split(folder: Path, files: tuple[str, ...]) -> Split:
    parts = [_read_batch(folder / name) for name in files]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    return Split(images, torch.from_numpy(np.concatenate([p[1] for p in parts])))


def find_folder(root: Path) -> Path | None:
    """The ``cifar-10-batches-py`` folder under ``root`` (or ``root`` itself), if present."""
    for folder in (root / FOLDER, root):
        if (folder / TRAIN_FILES[0]).exists() or (folder / TEST_FILES[0]).exists():
            return folder
    return None


# -- download --------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(root: Path, url: str, md5: str | None) -> Path:
    """Fetch and unpack the archive into ``root/cifar-10-batches-py``. The archive is written to
    a ``.part`` file and unpacked into a temporary folder; only a verified, complete result is
    renamed into place, so an interrupted download never looks like a dataset."""
    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(url).name
    if not archive.exists() or (md5 and _md5(archive) != md5):
        part = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(url) as response, part.open("wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise UsageError(f"could not download {url}: {e}") from None
        if md5 and _md5(part) != md5:
            part.unlink()
            raise UsageError(f"download of {url} failed its checksum (md5 {md5} expected)")
        os.replace(part, archive)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        found = find_folder(Path(tmp))
        if found is None:
            raise UsageError(f"{archive} does not contain {FOLDER}")
        os.replace(found, root / FOLDER)
    return root / FOLDER


# -- building the dataset --------------------------------------------------------------------


def balanced_subset(split: Split, size: int | None) -> Split:
    """The first ``size`` images in file order, taken round-robin over classes so every class
    is represented equally (±1)."""
    if size is None or size >= len(split):
        return split
    labels = split.labels
    # Rank of each image within its class; sorting by (rank, class) interleaves the classes.
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    order = torch.argsort(rank * 10 + labels, stable=True)[:size]
    order = order.sort().values
    return Split(split.images[order], labels[order])


def synthetic(train_size: int, test_size: int, seed: int = 0) -> tuple[Split, Split]:
    """A learnable 10-class set: each class has a smooth random colour pattern; images are that
    pattern plus noise, so a small CNN separates them within a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 3, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(protos, size=32, mode="bilinear")

    def make(n: int) -> Split:
        labels = torch.arange(n) % 10
        noise = torch.rand(n, 3, 32, 32, generator=gen)
        images = (0.6 * protos[labels] + 0.4 * noise) * 255
        return Split(images.round().to(torch.uint8), labels)

    return make(train_size), make(test_size)


def load(cfg: DictConfig, device: torch.device, seed: int = 0) -> Dataset:
    """Read (or make) the dataset named by the ``data`` config and move it to ``device``."""
    if cfg.name == "synthetic":
        train, test = synthetic(cfg.train_size or 512, cfg.test_size or 256, seed)
    else:
        train, test = _read_cifar(cfg)
        train, test = balanced_subset(train, cfg.train_size), balanced_subset(test, cfg.test_size)
    mean, std = channel_stats(train.images)
    return Dataset(train.to(device), test.to(device), mean.float().to(device),
                   std.float().to(device))


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of uint8 images on the [0, 1] scale, in float64,
    from one 256-bin histogram per channel: no float copy of the dataset (in float64 that
    copy of full CIFAR-10 would add 1.2 GB to the peak memory of every run)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    counts = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                          for c in range(images.shape[1])]).double()
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / (n - 1)
    return mean, var.sqrt()


def locate(cfg: DictConfig) -> Path | None:
    """The dataset folder named by the ``data`` config; None when it is to be downloaded (or
    made, for synthetic data). Cheap, so the CLI checks it before creating a run dir."""
    if cfg.name == "synthetic":
        return None
    root = Path(cfg.root).expanduser()
    folder = find_folder(root)
    if folder is None and not cfg.download:
        raise UsageError(
            f"CIFAR-10 not found: looked for {root / FOLDER}/data_batch_1 and "
            f"{root}/data_batch_1; set data.root=DIR to the folder holding {FOLDER}, "
            "or data.download=true to fetch it")
    return folder


def _read_cifar(cfg: DictConfig) -> tuple[Split, Split]:
    folder = locate(cfg) or download(Path(cfg.root).expanduser(), cfg.url, cfg.md5)
    return _read_split(folder, TRAIN_FILES), _read_split(folder, TEST_FILES)


# -- batches ---------------------------------------------------------------------------------


def _generator(device: torch.device, *key: int) -> torch.Generator:
    # Mix the key into one 63-bit seed; distinct keys give unrelated streams.
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) → float32, per-channel standardized."""
    scale = (1 / (255 * std)).view(1, 3, 1, 1)
    return images.to(torch.float32, copy=True).sub_((255 * mean).view(1, 3, 1, 1)).mul_(scale)


def augment(images: torch.Tensor, gen: torch.Generator, crop: bool, flip: bool) -> torch.Tensor:
    """Per-image random 32×32 crop of the 4-pixel zero-padded image and random horizontal flip,
    done for the whole batch at once with two gathers (no per-image Python loop); a flip just
    reverses the image's column index in the second gather."""
    n, c, h, w = images.shape
    device = images.device
    if not (crop or flip):
        return images
    cols = torch.arange(w, device=device).expand(n, w)
    if crop:
        images = torch.nn.functional.pad(images, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2, n), device=device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=device)).view(n, 1, h, 1)
        images = images.gather(2, rows.expand(n, c, h, w + 8))
        cols = dx[:, None] + cols
    if flip:
        mask = torch.rand(n, device=device, generator=gen) < 0.5
        cols = torch.where(mask[:, None], cols.flip(1), cols)
    return images.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    # The last partial batch is dropped: a batch of one would break BN (one value per channel).
    return len(data.train) // batch_size


def shard(n: int, rank: int, world_size: int) -> slice:
    """The ``rank``-th of ``world_size`` consecutive, near-equal parts of ``range(n)``."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def train_batches(data: Dataset, batch_size: int, seed: int, epoch: int, start: int,
                  first_step: int, aug: DictConfig, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start, start+1, …`` of epoch ``epoch``; ``first_step`` is the global step of
    batch ``start`` (it seeds that batch's augmentation). In a data-parallel run each process
    gets its ``rank``-th shard of every batch, of the very images and augmentation one process
    would draw (the whole batch is augmented, a cheap uint8 gather, then cut)."""
    device = data.train.labels.device
    gen = _generator(device, seed, epoch)
    order = torch.randperm(len(data.train), device=device, generator=gen)
    part = shard(batch_size, rank, world_size)
    for i in range(start, steps_per_epoch(data, batch_size)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        gen = _generator(device, seed, -1, first_step + i - start)
        images = augment(data.train.images[idx], gen, aug.crop, aug.flip)[part]
        yield normalize(images, data.mean, data.std), data.train.labels[idx][part]


def probe_batch(data: Dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, class-balanced, un-augmented batch from the *test* split: held out from
    training, and the same whether or not probes are on, so probing cannot change the run."""
    split = balanced_subset(data.test, size)
    return normalize(split.images, data.mean, data.std), split.labels


def eval_batches(data: Dataset, split: Split, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``split`` in batches, or in a data-parallel run this process's ``rank``-th part of it."""
    part = shard(len(split), rank, world_size)
    for i in range(part.start, part.stop, batch_size):
        end = min(i + batch_size, part.stop)
        yield normalize(split.images[i:end], data.mean, data.std), split.labels[i:end]
