"""Process setup lives in one place (``bnlab.runtime.setup_process``, called by the CLI); a
library call of ``bnlab.train.run`` leaves the process's torch settings as it found them."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_module
from torch.utils import deterministic

from bnlab import train
from bnlab.runtime import setup_process
from tests.cli import tiny


def settings() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)


def compose_cfg(*overrides: str):
    with initialize_config_module("bnlab.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_train_run_changes_no_process_setting(tmp_path, cifar_root):
    before = settings()
    cfg = compose_cfg(*tiny(cifar_root, "probe=off", "epochs=1", "threads=2",
                            "deterministic=true"))
    metrics = train.run(cfg, tmp_path / "run")
    assert metrics["status"] == "completed"
    assert settings() == before


def test_setup_process_applies_the_run_settings():
    before = settings()
    try:
        setup_process(compose_cfg("threads=1", "deterministic=true"))
        assert settings() == (1, True, False, False)
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        deterministic.fill_uninitialized_memory = before[2]
        torch.backends.cudnn.benchmark = before[3]
