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
from bnlab.distributed import ALONE, World, all_sum
from bnlab.precise_bn import pool_over_ranks, precise_bn_copy

Forward = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, forward: Forward, data: datasets.Dataset, cfg: DictConfig,
             fmt: torch.memory_format, world: World = ALONE) -> tuple[float, float]:
    """Test loss and accuracy of ``forward`` (``model``, its compiled form or a Precise BN copy
    of it) with ``model`` in eval mode; ``model`` is back in train mode afterwards. In a
    data-parallel run each rank evaluates its part of the test split and the sums are added:
    every rank gets the same numbers."""
    device = data.test.images.device
    model.eval()
    sums = torch.zeros(2, device=device)  # loss, correct
    split = data.test
    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
        for x, y in datasets.eval_batches(data, split, cfg.eval_batch_size, world.rank,
                                          world.size):
            out = forward(x.contiguous(memory_format=fmt)).float()
            sums[0] += F.cross_entropy(out, y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
    model.train()
    loss, correct = all_sum(world, sums).tolist()
    return loss / len(split), correct / len(split)


def evaluate_precise_bn(model: nn.Module, data: datasets.Dataset, cfg: DictConfig,
                        fmt: torch.memory_format, epoch: int, world: World = ALONE
                        ) -> tuple[float, float]:
    """Test loss and accuracy with Precise BN: the norm layers' statistics re-estimated from
    ``eval.precise_bn_batches`` training batches of ``epoch``, in a copy of the model (the run
    itself is untouched; batches are drawn without the global RNG). In a data-parallel run
    each rank takes its shards of those batches and the statistics are pooled over ranks."""
    batches = datasets.train_batches(data, cfg.batch_size, cfg.seed, epoch, 0, 0,
                                     cfg.data.augment, world.rank, world.size)
    inputs = (x.contiguous(memory_format=fmt) for x, _ in batches)
    device = data.test.images.device
    pool = pool_over_ranks(world) if world.size > 1 else None
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
        twin = precise_bn_copy(model, inputs, cfg.eval.precise_bn_batches, pool)
    twin.eval()
    return evaluate(twin, twin, data, cfg, fmt, world)
