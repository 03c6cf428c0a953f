from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnlab import data
from bnlab.errors import UsageError
from tests.cifar_files import make_images, write_cifar


def cfg(root: Path, **kw: object):
    base = {"name": "cifar10", "root": str(root), "download": False, "url": None, "md5": None,
            "train_size": None, "test_size": None, "augment": {"crop": True, "flip": True}}
    return OmegaConf.create({**base, **kw})


def test_reads_python3_and_official_python2_formats_alike(cifar_root, cifar_root_py2):
    a = data.load(cfg(cifar_root), torch.device("cpu"))
    b = data.load(cfg(cifar_root_py2), torch.device("cpu"))
    assert a.train.images.shape == (100, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert len(a.test) == 40
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.labels, b.train.labels)
    expected, labels = make_images(20, seed=0)  # data_batch_1 comes first, in file order
    assert torch.equal(a.train.images[:20].reshape(20, -1), torch.from_numpy(expected))
    assert a.train.labels[:20].tolist() == labels


def test_mean_and_std_come_from_the_training_split(cifar_root):
    d = data.load(cfg(cifar_root), torch.device("cpu"))
    pixels = d.train.images.double() / 255
    assert torch.allclose(d.mean.double(), pixels.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(d.std.double(), pixels.std(dim=(0, 2, 3)), atol=1e-6)
    x = data.normalize(d.train.images, d.mean, d.std)
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_root_may_be_the_batches_folder_itself(cifar_root):
    d = data.load(cfg(cifar_root / data.FOLDER), torch.device("cpu"))
    assert len(d.train) == 100


def test_balanced_subset_takes_equal_counts_per_class(cifar_root):
    d = data.load(cfg(cifar_root, train_size=30, test_size=25), torch.device("cpu"))
    assert len(d.train) == 30 and len(d.test) == 25
    assert torch.bincount(d.train.labels, minlength=10).tolist() == [3] * 10
    counts = torch.bincount(d.test.labels, minlength=10)
    assert counts.max() - counts.min() <= 1


def test_missing_root_names_where_it_looked_and_the_fix(tmp_path):
    with pytest.raises(UsageError, match=r"CIFAR-10 not found: looked for .*data.root=.*"
                                         r"data.download=true"):
        data.load(cfg(tmp_path / "nowhere"), torch.device("cpu"))


def corrupt(root: Path, name: str, blob: bytes) -> Path:
    (root / data.FOLDER / name).write_bytes(blob)
    return root


@pytest.mark.parametrize(("name", "blob", "message"), [
    ("data_batch_3", b"", "truncated or not a pickle"),
    ("data_batch_3", b"not a pickle at all", "truncated or not a pickle"),
    ("test_batch", pickle.dumps({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}),
     r"shape \(N, 3072\)"),
    ("data_batch_2", pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 12]}),
     r"labels must lie in 0..9"),
    ("data_batch_2", pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]}),
     r"2 labels for 4 images"),
    ("data_batch_5", pickle.dumps([1, 2, 3]), "not a CIFAR-10 batch dict"),
])
def test_corrupt_files_give_one_clear_error(tmp_path, name, blob, message):
    root = corrupt(write_cifar(tmp_path), name, blob)
    with pytest.raises(UsageError, match=message) as err:
        data.load(cfg(root), torch.device("cpu"))
    assert name in str(err.value) and "\n" not in str(err.value)


def test_truncated_file_is_reported(tmp_path):
    root = write_cifar(tmp_path)
    path = root / data.FOLDER / "data_batch_4"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UsageError, match=r"data_batch_4 is truncated"):
        data.load(cfg(root), torch.device("cpu"))


def test_missing_batch_file_is_reported(tmp_path):
    root = write_cifar(tmp_path)
    (root / data.FOLDER / "data_batch_5").unlink()
    with pytest.raises(UsageError, match=r"CIFAR-10 file missing: .*data_batch_5"):
        data.load(cfg(root), torch.device("cpu"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = corrupt(write_cifar(tmp_path), "data_batch_1",
                   pickle.dumps({"data": _Evil(), "labels": []}))
    with pytest.raises(UsageError, match=r"not a CIFAR-10 batch file: refusing to load .*system"):
        data.load(cfg(root), torch.device("cpu"))
    assert not (tmp_path / "pwned").exists()


def test_augment_crops_a_window_of_the_padded_image_and_flips():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = data.augment(images, gen, crop=True, flip=True)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(64):  # each output is some 32×32 window of the padded image, maybe flipped
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    assert not torch.equal(out, images)
    assert torch.equal(data.augment(images, gen, crop=False, flip=False), images)


def test_batches_are_a_pure_function_of_seed_epoch_and_step(cifar_root):
    d = data.load(cfg(cifar_root), torch.device("cpu"))
    aug = OmegaConf.create({"crop": True, "flip": True})
    full = list(data.train_batches(d, 16, seed=3, epoch=2, start=0, first_step=50, aug=aug))
    tail = list(data.train_batches(d, 16, seed=3, epoch=2, start=4, first_step=54, aug=aug))
    assert len(full) == data.steps_per_epoch(d, 16) == 6  # the partial batch is dropped
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(data.train_batches(d, 16, seed=3, epoch=3, start=0, first_step=56, aug=aug))
    assert not torch.equal(full[0][1], other[0][1])


def test_synthetic_data_is_deterministic_and_balanced():
    a = data.load(OmegaConf.create({"name": "synthetic", "train_size": 100, "test_size": 50}),
                  torch.device("cpu"), seed=1)
    b = data.load(OmegaConf.create({"name": "synthetic", "train_size": 100, "test_size": 50}),
                  torch.device("cpu"), seed=1)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10


def make_archive(tmp_path: Path) -> tuple[Path, str]:
    src = write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / data.FOLDER, arcname=data.FOLDER)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_the_checksum_and_unpacks(tmp_path):
    archive, md5 = make_archive(tmp_path)
    root = tmp_path / "root"
    d = data.load(cfg(root, download=True, url=archive.as_uri(), md5=md5), torch.device("cpu"))
    assert len(d.train) == 100
    assert not list(root.glob("*.part"))


def test_a_download_with_a_bad_checksum_leaves_nothing_that_looks_complete(tmp_path):
    archive, _ = make_archive(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(UsageError, match="failed its checksum"):
        data.load(cfg(root, download=True, url=archive.as_uri(), md5="0" * 32),
                  torch.device("cpu"))
    assert not (root / data.FOLDER).exists()
    assert not (root / archive.name).exists() and not list(root.glob("*.part"))


def test_unreachable_download_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="could not download"):
        data.load(cfg(tmp_path / "r", download=True, url=(tmp_path / "no.tar.gz").as_uri(),
                      md5=None), torch.device("cpu"))


def test_probe_batch_is_fixed_and_from_the_test_split(cifar_root):
    d = data.load(cfg(cifar_root), torch.device("cpu"))
    x, y = data.probe_batch(d, 20)
    x2, _ = data.probe_batch(d, 20)
    assert torch.equal(x, x2) and torch.bincount(y).tolist() == [2] * 10
    test_images = data.normalize(d.test.images, d.mean, d.std)
    for image in x:
        assert any(torch.equal(image, t) for t in test_images)
