"""Keeping a probe's forward passes from changing the run.

A probe forward must leave the run exactly as it found it (the read-only contract): the same
train/eval flags, the same buffers (BN running mean/var and ``num_batches_tracked``), the same
global RNG streams that dropout, noisy BN and augmentation draw from, the same parameters and
``.grad``. Parameters and ``.grad`` are never written by a probe (substituted weights go through
``torch.func.functional_call`` and gradients through ``torch.autograd.grad``); flags, buffers
and the RNG are restored by the two context managers here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn

PROBE_SEED = 20150211  # the RNG seed of every probe forward (the BN paper's arXiv date)


@contextlib.contextmanager
def read_only(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every buffer on exit, so train-mode probe
    forwards may update BN running stats freely in between."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b, b.clone()) for m in model.modules()
               for name, b in m.named_buffers(recurse=False)]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, name, b, saved in buffers:
                setattr(m, name, b)  # the original tensor object, even if a module replaced it
                b.copy_(saved)


@functools.lru_cache(maxsize=4)
def _seeded_states(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Generator states for CPU and ``device`` after seeding with ``seed`` (the fixed probe
    seed's are made once and reused)."""
    cpu = torch.Generator().manual_seed(seed).get_state()
    dev = (None if device.type == "cpu"
           else torch.Generator(device=device).manual_seed(seed).get_state())
    return cpu, dev


@contextlib.contextmanager
def fixed_rng(device: torch.device, seed: int = PROBE_SEED) -> Iterator[None]:
    """Run the block with the global CPU and ``device`` generators seeded with ``seed``, and
    put the run's own streams back on exit. Probe forwards under one seed draw the same dropout
    masks and BN noise, so their results differ only where the weights do, and the training run
    never sees that a probe drew random numbers."""
    accelerator = device.type != "cpu"
    devices = [device] if accelerator else []
    device_type = device.type if accelerator else None
    cpu, dev = _seeded_states(device, seed)
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.get_device_module(device.type).set_rng_state(dev, device)
        yield
