"""Test-set evaluation: the model's accuracy with its own statistics, and with Precise BN's.

Both run the whole test split in eval mode, under the run's autocast, and read one number back
per evaluation (not per batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from bnlab import data as datasets
from bnlab.precise_bn import precise_bn_copy

Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, forward: Forward, data: datasets.Dataset, cfg: DictConfig,
             fmt: torch.memory_format) -> tuple[float, float]:
    """Test loss and accuracy of ``forward`` (``model``, its compiled form or a Precise BN copy
    of it) with ``model`` in eval mode; ``model`` is back in train mode afterwards."""
    device = data.test.images.device
    model.eval()
    loss, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    split = data.test
    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
        for x, y in datasets.eval_batches(data, split, cfg.eval_batch_size):
            out = forward(x.contiguous(memory_format=fmt)).float()
            loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
    model.train()
    return loss.item() / len(split), correct.item() / len(split)


def evaluate_precise_bn(model: nn.Module, data: datasets.Dataset, cfg: DictConfig,
                        fmt: torch.memory_format, epoch: int) -> tuple[float, float]:
    """Test loss and accuracy with Precise BN: the norm layers' statistics re-estimated from
    ``eval.precise_bn_batches`` training batches of ``epoch``, in a copy of the model (the run
    itself is untouched; batches are drawn without the global RNG)."""
    batches = datasets.train_batches(data, cfg.batch_size, cfg.seed, epoch, 0, 0,
                                     cfg.data.augment)
    inputs = (x.contiguous(memory_format=fmt) for x, _ in batches)
    device = data.test.images.device
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
        twin = precise_bn_copy(model, inputs, cfg.eval.precise_bn_batches)
    twin.eval()
    return evaluate(twin, twin, data, cfg, fmt)
