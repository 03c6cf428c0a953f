"""Sample similarity and rank during training: the Gram matrix of the probe batch's samples at
each watched layer (Daneshmand et al. 2020; Lubana et al. 2021).

Across *samples*, where ``white/`` is across channels: G = X̂ X̂ᵀ for the first ``gram_samples``
samples of the fixed probe batch, each sample's whole activation flattened and scaled to unit
norm (``bnlab.signal.measures``, which defines every number and which ``bnlab signal`` uses at
initialization). Taken in the shared probe forward (``forward.probe_forward``: train mode,
read-only, seeded), inside a forward hook, so it costs no forward of its own:

- ``gram/cos_sim/<layer>``: the mean cosine similarity of two different samples;
- ``gram/stable_rank/<layer>``: ‖G‖_F² / ‖G‖₂², between 1 (collapsed) and N;
- ``gram/erank/<layer>``: the effective rank of G, between 1 and N.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.signal.measures import gram_measures, sample_gram


class GramProbe:
    """Records the sample Gram measures of each watched layer in the probe forward (an
    ``Observer``); ``measure`` returns the ``gram/`` scalars."""

    def __init__(self, model: nn.Module, layers: list[str], samples: int) -> None:
        self.modules = {name: model.get_submodule(name) for name in layers}
        self.samples = samples
        self.captured: dict[str, dict[str, Tensor]] = {}

    def attach(self) -> list[RemovableHandle]:
        def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                # inside the hook: an in-place ReLU overwrites the output right after
                self.captured[name] = gram_measures(sample_gram(output, self.samples))
            return hook

        return [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]

    def measure(self) -> dict[str, Tensor]:
        captured, self.captured = self.captured, {}
        return {f"gram/{measure}/{name}": value for name, values in captured.items()
                for measure, value in values.items()}
