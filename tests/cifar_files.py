"""Tiny CIFAR-10 datasets in the on-disk python-pickle layout, for tests.

Two flavours: a Python-3 re-pack (protocol 4, str keys, like ../shared's subset) and a faithful
imitation of the official Python-2 files (protocol 2, byte-string keys and data written as
Python-2 ``str`` opcodes, ``numpy.core`` module paths).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from bnlab.data import FOLDER, TEST_FILES, TRAIN_FILES


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us change how bytes are saved
    """Writes ``bytes`` as Python 2 ``str`` opcodes (BINSTRING), as Python 2 itself did."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + n.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # noqa: RUF012 - pickle looks it up per class
    dispatch[bytes] = save_bytes


def py2_pickle(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its reconstructor numpy._core; the official files say numpy.core.
    return buf.getvalue().replace(b"numpy._core.", b"numpy.core.")


def make_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    labels = [i % 10 for i in range(n)]
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    for i, y in enumerate(labels):  # a class-dependent brightness makes the set learnable
        data[i, : 1024] = (data[i, : 1024] // 4 + 20 * y).astype(np.uint8)
    return data, labels


def write_cifar(root: Path, per_batch: int = 20, test: int = 40, py2: bool = False) -> Path:
    """Write a CIFAR-10 folder under ``root`` and return ``root``."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate((*TRAIN_FILES, *TEST_FILES)):
        n = test if name in TEST_FILES else per_batch
        data, labels = make_images(n, seed=i)
        if py2:
            blob = py2_pickle({b"batch_label": name.encode(), b"labels": labels,
                               b"data": data, b"filenames": [b"x.png"] * n})
        else:
            blob = pickle.dumps({"batch_label": name, "labels": labels, "data": data,
                                 "filenames": ["x.png"] * n}, protocol=4)
        (folder / name).write_bytes(blob)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root
