"""No host synchronization inside a training step, except CPU-only shortcuts.

On an accelerator every read of a tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``, data-dependent shapes such as ``nonzero``) waits for the device. ``bnlab train``
reads values only in ``Trainer.sync`` (every ``log_every`` steps) and at evaluation. A real run
on CPU is recorded here op by op; inside ``Trainer.train_step``, and while the next batch is
drawn, the only value reads allowed are
the two shortcuts that are taken on CPU only (where a read costs no sync), and a second test
shows that those shortcuts read nothing for tensors on another device.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab.train as train
from bnlab.nn.batchnorm_fast import _is_well_conditioned
from bnlab.probes.gradients import _nonfinite_fraction

aten = torch.ops.aten
# Ops that make the host wait for the device: value reads and data-dependent output shapes.
SYNCING = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
    aten._unique2.default,
}
# Reads that bypass the dispatcher for CPU tensors (they copy to the host on a device).
HOST_READS = ("tolist", "numpy")
CPU_ONLY_SHORTCUTS = {"_is_well_conditioned", "_nonfinite_fraction"}


class SyncRecorder(TorchDispatchMode):
    """Records the call stack of every syncing op, and whether it ran inside a train step."""

    def __init__(self) -> None:
        super().__init__()
        self.in_step = False  # inside Trainer.train_step, or drawing the next batch
        self.inside: list[list[str]] = []  # function names of each stack
        self.outside = 0

    def record(self) -> None:
        if self.in_step:
            self.inside.append([frame.name for frame in traceback.extract_stack()])
        else:
            self.outside += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            self.record()
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("norm", "probe"), [("custom", "full"), ("noisy", "default"),
                                             ("torch", "default")])
def test_no_host_sync_inside_a_training_step(monkeypatch, tmp_path, cifar_root,
                                             norm, probe):
    recorder = SyncRecorder()
    train_step = train.Trainer.train_step

    def recorded_step(self, *args, **kwargs):
        recorder.in_step = True
        try:
            return train_step(self, *args, **kwargs)
        finally:
            recorder.in_step = False

    monkeypatch.setattr(train.Trainer, "train_step", recorded_step)
    train_batches = train.datasets.train_batches

    def recorded_batches(*args, **kwargs):  # drawing each batch counts as part of the step
        batches = train_batches(*args, **kwargs)
        while True:
            recorder.in_step = True
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                recorder.in_step = False
            yield batch

    monkeypatch.setattr(train.datasets, "train_batches", recorded_batches)
    for name in HOST_READS:
        read = getattr(torch.Tensor, name)

        def recorded_read(t, *args, _read=read, **kwargs):
            recorder.record()
            return _read(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recorded_read)

    overrides = [f"data.root={cifar_root}", f"norm={norm}", f"probe={probe}", "epochs=2",
                 "batch_size=16", "log_every=4", "progress=false", "threads=1"]
    with initialize_config_module("bnlab.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with recorder:
        metrics = train.run(cfg, Path(tmp_path) / "run")

    assert metrics["status"] == "completed" and metrics["steps"] == 12
    assert recorder.outside > 0  # the recorder sees the reads of sync() and evaluate()
    for stack in recorder.inside:
        assert CPU_ONLY_SHORTCUTS & set(stack), " <- ".join(reversed(stack[-8:]))


def test_cpu_only_shortcuts_read_no_value_on_other_devices():
    """On the meta device any value read raises, so these calls prove no read happens."""
    x = torch.empty(8, 3, 4, 4, device="meta")
    center, var = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    assert _is_well_conditioned(x, center, var, 1e-5) is False
    grads = [torch.empty(3, 3, device="meta"), torch.empty(3, device="meta")]
    fraction = _nonfinite_fraction(grads, torch.empty((), device="meta"))
    assert fraction.device.type == "meta" and fraction.shape == ()
    with pytest.raises(Exception):  # noqa: B017 - what a read of a meta tensor raises varies
        bool(torch.empty((), device="meta"))
