from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.cifar_files import write_cifar

# Two cores here: keep each test process to one thread so parallel helpers don't thrash.
torch.set_num_threads(1)
os.environ.setdefault("CI", "1")  # quiet progress bars in subprocess runs


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Each test draws from torch's global generator as if it ran alone: its inputs do not
    depend on which tests ran before it in its process (pytest-xdist orders them per worker)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-10 (100 train / 40 test images) in the re-packed Python-3 format."""
    return write_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def cifar_root_py2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in the official Python-2 pickle format."""
    return write_cifar(tmp_path_factory.mktemp("cifar_py2"), py2=True)
