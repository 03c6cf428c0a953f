"""The writer of a run's TensorBoard events: scalars, histograms, hparams.

Scalars arrive as floats or 0-d device tensors and are buffered; ``flush()`` moves all buffered
tensors to the host in one transfer, so on a GPU the training step never waits for the logger.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import summary_v2 as hp
from torch.utils.tensorboard import SummaryWriter


class Tracker:
    """TensorBoard writer for one run dir. ``purge_step`` (on resume) tells TensorBoard to drop
    events at or after that step from earlier files, so a resumed log has no duplicated steps."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step, flush_secs=60)
        self._pending: list[tuple[int, str, torch.Tensor | float]] = []

    def scalars(self, values: Mapping[str, torch.Tensor | float], step: int) -> None:
        self._pending.extend((step, tag, v) for tag, v in values.items())

    def histograms(self, values: Mapping[str, torch.Tensor], step: int) -> None:
        for tag, v in values.items():
            finite = v.detach().float().flatten()
            finite = finite[torch.isfinite(finite)].cpu()
            if finite.numel():  # TensorBoard rejects empty or non-finite histograms
                self.writer.add_histogram(tag, finite, step)

    def flush(self) -> None:
        """Write buffered scalars, with a single device-to-host transfer for all tensors and one
        event per step (``add_scalar`` would write one event, with its Python overhead, per
        value: with per-parameter gradient norms that is dozens of events a step)."""
        if not self._pending:
            return
        tensors = [v for _, _, v in self._pending if isinstance(v, torch.Tensor)]
        host = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
                    if tensors else [])
        by_step: dict[int, list[Summary.Value]] = defaultdict(list)
        for step, tag, v in self._pending:
            value = next(host) if isinstance(v, torch.Tensor) else float(v)
            by_step[step].append(Summary.Value(tag=tag, simple_value=value))
        for step, values in by_step.items():
            self.writer.file_writer.add_summary(Summary(value=values), step)
        self._pending.clear()
        self.writer.flush()

    def layout(self, layers: list[str]) -> None:
        """A custom-scalars chart per watched layer with its 15/50/85th percentile band, the
        view of Ioffe & Szegedy (2015, Fig. 1)."""
        charts = {layer: ["Margin", [f"act/p50/{layer}", f"act/p15/{layer}", f"act/p85/{layer}"]]
                  for layer in layers}
        self.writer.add_custom_scalars({"percentiles": charts})

    def hparams(self, params: Mapping[str, object], metrics: Mapping[str, float],
                step: int) -> None:
        """The HParams dashboard entry, written into this run's own log dir (SummaryWriter's
        add_hparams would make a sub-run dir instead), with an explicit experiment config: the
        columns in the order of ``params`` (what a user compares first, first) and the metrics,
        rather than whatever order TensorBoard infers across runs."""
        values = {k: "null" if v is None else v for k, v in params.items()}
        config = hp.hparams_config_pb(hparams=[hp.HParam(k) for k in values],
                                      metrics=[hp.Metric(tag) for tag in metrics])
        self.writer.file_writer.add_summary(config)
        self.writer.file_writer.add_summary(hp.hparams_pb(values))
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()


class NullTracker(Tracker):
    """The tracker of a data-parallel run's ranks other than 0: it writes nothing (rank 0 logs
    for the job)."""

    def __init__(self) -> None:  # no writer
        pass

    def scalars(self, values: Mapping[str, torch.Tensor | float], step: int) -> None:
        pass

    def histograms(self, values: Mapping[str, torch.Tensor], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def layout(self, layers: list[str]) -> None:
        pass

    def hparams(self, params: Mapping[str, object], metrics: Mapping[str, float],
                step: int) -> None:
        pass

    def close(self) -> None:
        pass
