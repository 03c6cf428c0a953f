"""One measurement of a model's signal propagation on one batch, read-only.

:func:`measure_batch` runs one train-mode forward of the batch (every norm layer normalizes with
the batch's own statistics, as in training) with forward hooks at every position of
:mod:`bnlab.signal.positions`, then one backward for the gradient norms. It runs as the probes'
forwards do: inside ``read_only`` (flags and buffers, BN running statistics included, restored),
under a seeded RNG (dropout masks and BN noise drawn from it; the caller's RNG streams put back),
without autocast, and with gradients from ``torch.autograd.grad`` (no ``.grad`` written). The
model ends exactly as it started.

What one batch gives (floats; the measures are defined in :mod:`bnlab.signal.measures`):

- ``positions[(kind, name)]``: ``mean_sq`` and ``var`` over the whole batch, and at slot inputs
  and block outputs (``positions.GRAM_KINDS``) ``cos_sim``, ``stable_rank`` and ``erank`` of
  the first ``samples`` samples' Gram matrix;
- ``blocks[name]``: ``mean_sq`` and ``var`` of the block's output, ``branch_var`` and
  ``skip_var`` (the average channel variance at the end of the residual branch and of the skip
  path) and ``branch_skip_ratio`` = branch_var / skip_var;
- ``grad_norms[weight]``: ‖∂L/∂W‖_F of each gradient layer's weight, L the mean cross-entropy
  of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.probes.readonly import fixed_rng, read_only
from bnlab.signal.measures import channel_moments, gram_measures, sample_gram
from bnlab.signal.positions import Position, ResidualBlock


@dataclass
class BatchSignal:
    """What one batch gives (see the module docstring)."""

    positions: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)


Hook = Callable[[nn.Module, tuple, Tensor], None]


class SignalRecorder:
    """Forward hooks that record the measures at each position and each block's parts during
    one forward (statistics are taken inside the hook: an in-place ReLU overwrites the output
    right after)."""

    def __init__(self, model: nn.Module, positions: list[Position], blocks: list[ResidualBlock],
                 samples: int) -> None:
        self.model, self.positions, self.blocks, self.samples = model, positions, blocks, samples
        self.captured: dict[tuple[str, str], dict[str, Tensor]] = {}

    def _hook(self, key: tuple[str, str], gram: bool) -> Hook:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            values = channel_moments(output)
            if gram:
                values |= gram_measures(sample_gram(output, self.samples))
            self.captured[key] = values
        return hook

    def attach(self) -> list[RemovableHandle]:
        hooks = [(p.name, (p.kind, p.name), p.gram) for p in self.positions]
        for b in self.blocks:
            hooks += [(b.branch, ("branch", b.name), False), (b.shortcut, ("skip", b.name), False)]
            if not any(p.kind == "block_output" and p.name == b.name for p in self.positions):
                hooks.append((b.name, ("block_output", b.name), False))
        return [self.model.get_submodule(module).register_forward_hook(self._hook(key, gram))
                for module, key, gram in hooks]

    def result(self) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, dict]]:
        """The positions' and the blocks' numbers of the forward just observed, as floats (one
        host transfer)."""
        keys = list(self.captured)
        measures = [list(self.captured[k]) for k in keys]
        values = torch.stack([v for k in keys for v in self.captured[k].values()]).tolist()
        self.captured = {}
        floats, i = {}, 0
        for key, names in zip(keys, measures, strict=True):
            floats[key] = dict(zip(names, values[i:i + len(names)], strict=True))
            i += len(names)
        positions = {(p.kind, p.name): floats[(p.kind, p.name)] for p in self.positions}
        blocks = {}
        for b in self.blocks:
            out, branch, skip = (floats[(k, b.name)] for k in ("block_output", "branch", "skip"))
            blocks[b.name] = {"mean_sq": out["mean_sq"], "var": out["var"],
                              "branch_var": branch["var"], "skip_var": skip["var"],
                              "branch_skip_ratio": _ratio(branch["var"], skip["var"])}
        return positions, blocks


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def measure_batch(model: nn.Module, inputs: Tensor, targets: Tensor, positions: list[Position],
                  blocks: list[ResidualBlock], grad_layers: list[str], samples: int,
                  seed: int) -> BatchSignal:
    """The signal of ``model`` on one batch (see the module docstring); ``seed`` seeds the
    forward's RNG (dropout, BN noise)."""
    recorder = SignalRecorder(model, positions, blocks, samples)
    params = dict(model.named_parameters())
    weights = [params[name] for name in grad_layers]
    handles = recorder.attach()
    try:
        with (read_only(model), fixed_rng(inputs.device, seed), torch.enable_grad(),
              torch.autocast(inputs.device.type, enabled=False)):
            model.train()
            loss = F.cross_entropy(model(inputs).float(), targets)
            grads = torch.autograd.grad(loss, weights, allow_unused=True, materialize_grads=True)
    finally:
        for handle in handles:
            handle.remove()
    position_values, block_values = recorder.result()
    norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).tolist() \
        if grads else []
    return BatchSignal(position_values, block_values, dict(zip(grad_layers, norms, strict=True)))
