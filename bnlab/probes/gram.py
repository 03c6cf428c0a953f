"""Sample similarity and rank during training: the Gram matrix of the probe batch's samples at
each watched layer (Daneshmand et al. 2020; Lubana et al. 2021).

Across *samples*, where ``white/`` is across channels: G = X̂ X̂ᵀ for the first
``probe.gram_samples`` samples of the fixed probe batch (all of them if the batch is smaller,
so ``probe.batch_size`` may be lowered alone), each sample's whole activation flattened and
scaled to unit norm (``bnlab.signal.measures``, which defines every number and which ``bnlab
signal`` uses at initialization). Taken in the shared probe forward
(``forward.probe_forward``: train mode, read-only, seeded), inside a forward hook, so it costs
no forward of its own:

- ``gram/cos_sim/<layer>``: the mean cosine similarity of two different samples;
- ``gram/stable_rank/<layer>``: ‖G‖_F² / ‖G‖₂², between 1 (collapsed) and N;
- ``gram/erank/<layer>``: the effective rank of G, between 1 and N.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bnlab.probes.base import Column, Interval, Measurements, Panel, Probe, Setup, every
from bnlab.registry import Schema
from bnlab.signal.measures import gram_measures, sample_gram


class GramProbe(Probe):
    """Records the sample Gram measures of each watched layer in the probe forward;
    ``measure`` returns the ``gram/`` scalars."""

    name = "gram"
    runs = ("probe_batch",)

    class Keys(Schema):
        gram_every: Interval = every(0, "sample similarity and rank: the Gram matrix of the "
                                     "probe batch's samples at each watched layer")
        gram_samples: int = Field(64, ge=2, description="samples in each Gram matrix: the "
                                  "first N of the probe batch (all of it if it is smaller)")

    tags: ClassVar[dict[str, str]] = {
        "gram/cos_sim/<layer>": "mean cosine similarity of two different samples' "
                                "activations (the first gram_samples of the probe batch)",
        "gram/stable_rank/<layer>": "stable rank ‖G‖_F² / ‖G‖₂² of their N×N Gram matrix, "
                                    "1 (collapsed) to N",
        "gram/erank/<layer>": "effective rank of the Gram matrix (Roy & Vetterli 2007), 1 to N",
    }
    columns = (Column("gram_cos_sim", "final sample cos sim (deepest)", "gram/cos_sim/",
                      steps="last", modules="deepest", optional=True),
               Column("gram_erank", "final sample erank (deepest)", "gram/erank/",
                      steps="last", modules="deepest", optional=True))
    panels = (Panel("gram/cos_sim/", "samples: mean\ncosine similarity"),
              Panel("gram/erank/", "samples: effective\nrank of Gram"))

    def __init__(self, cfg: Any, setup: Setup) -> None:
        super().__init__(cfg, setup)
        self.modules = {name: setup.model.get_submodule(name) for name in setup.watched}
        self.samples: int = cfg.gram_samples
        self.captured: dict[str, dict[str, Tensor]] = {}

    def attach(self) -> list[RemovableHandle]:
        def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                # inside the hook: an in-place ReLU overwrites the output right after
                self.captured[name] = gram_measures(sample_gram(output, self.samples))
            return hook

        return [m.register_forward_hook(hook_for(n)) for n, m in self.modules.items()]

    def measure(self, step: int) -> Measurements:
        captured, self.captured = self.captured, {}
        return Measurements({f"gram/{measure}/{name}": value for name, values in captured.items()
                             for measure, value in values.items()})
