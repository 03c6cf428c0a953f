"""Reading a run's TensorBoard event files with TensorBoard's own reader.

A resumed run leaves several event files. The reader takes them oldest first and, where a newer
file restarts at an earlier step (its purge marker, or simply a step going back), drops what
the older ones logged from there on: those points belong to the part of the run that was lost
and redone after the resume, so the later file wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tb_logging

from bnlab.analysis.runs import event_files
from bnlab.errors import UsageError


@dataclass(frozen=True)
class Series:
    """One scalar tag over training: steps ascending, values as logged (may be non-finite)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class Snapshot:
    """One histogram: `counts[i]` values fell in `[edges[i], edges[i + 1]]`."""

    step: int
    edges: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class Events:
    files: tuple[Path, ...]
    scalars: dict[str, Series]
    histograms: dict[str, list[Snapshot]]

    def tags(self, prefix: str) -> list[str]:
        """Scalar tags that start with `prefix`, in the order the run first logged them."""
        return [tag for tag in self.scalars if tag.startswith(prefix)]

    def layers(self, prefix: str) -> list[str]:
        """`act/p50/` -> the layers logged under it (module paths), in logged order."""
        names = [*self.scalars, *self.histograms]
        return list(dict.fromkeys(t[len(prefix) :] for t in names if t.startswith(prefix)))

    def layers_in(self, group: str) -> list[str]:
        """`act/` -> the layers under any kind of the group (`act/p50/<layer>`,
        `act/hist/<layer>`, ...), in logged order."""
        names = [*self.scalars, *self.histograms]
        split = (t[len(group) :].split("/", 1) for t in names if t.startswith(group))
        return list(dict.fromkeys(parts[1] for parts in split if len(parts) == 2))

    def steps(self) -> tuple[int, int] | None:
        """First and last step at which anything was logged."""
        firsts = [int(s.steps[0]) for s in self.scalars.values() if len(s.steps)]
        lasts = [int(s.steps[-1]) for s in self.scalars.values() if len(s.steps)]
        for snaps in self.histograms.values():
            firsts.append(snaps[0].step)
            lasts.append(snaps[-1].step)
        return (min(firsts), max(lasts)) if firsts else None


def read_events(run_dir: Path, histograms: bool = True) -> Events:
    """All scalars (and histograms, unless told not to) of a run dir's event files.

    Raises UsageError naming the file when an event file is corrupt; a record cut short at
    the end is no corruption but a writer still at work, and reads as the records before it.
    """
    files = event_files(run_dir)
    if not files:
        return Events((), {}, {})
    acc = _load(run_dir, histograms)
    tags = acc.Tags()
    return Events(
        files=tuple(files),
        scalars={tag: _series(acc.Scalars(tag)) for tag in tags[ea.SCALARS]},
        histograms={tag: _snapshots(acc.Histograms(tag))
                    for tag in (tags[ea.HISTOGRAMS] if histograms else ())},
    )


def _load(run_dir: Path, histograms: bool) -> ea.EventAccumulator:
    # 0 keeps every point; 1 keeps the least of what this analysis never looks at.
    guidance = {ea.SCALARS: 0, ea.HISTOGRAMS: 0 if histograms else 1}
    guidance |= {k: 1 for k in (ea.COMPRESSED_HISTOGRAMS, ea.IMAGES, ea.AUDIO, ea.TENSORS)}
    # Given the dir, the reader goes through its event files oldest first and drops what a
    # resumed writer redid (a restart marker or a step going back), so later files win.
    acc = ea.EventAccumulator(str(run_dir), size_guidance=guidance)
    with _data_loss_errors() as errors:
        try:
            acc.Reload()
        except (OSError, DecodeError) as err:
            raise UsageError(f"cannot read the event files in {run_dir}: {err}") from err
    if errors:
        file, reason = errors[0]
        raise UsageError(f"corrupt event file {file} ({reason}); move it out of the run dir")
    return acc


@contextmanager
def _data_loss_errors() -> Iterator[list[tuple[str, str]]]:
    """Collect the corrupt-record errors TensorBoard's reader meets.

    The reader stops at a bad record and only says so in a debug log line, the same way for
    a record half-written by a live writer (harmless) and a failed checksum (corruption), so
    the log is the one place the difference shows.
    """
    logger = tb_logging.get_logger()
    errors: list[tuple[str, str]] = []
    handler = _DataLossHandler(errors)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the reader's debug chatter away from the app's logging
    try:
        yield errors
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class _DataLossHandler(logging.Handler):
    """Keeps (file, reason) of each corrupt record from the reader's `Truncated record in
    <file> (<DataLossError>)` debug lines."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__(logging.DEBUG)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if type(arg).__name__ == "DataLossError":
                message = (getattr(arg, "message", None) or str(arg)).lower()
                if "truncated record" not in message:
                    # The reader's message repeats the path; the checksum is what matters.
                    reason = "a record fails its crc32 check" if "crc32" in message else message
                    self.errors.append((str(args[0]), reason))


def _series(events: list[ea.ScalarEvent]) -> Series:
    points = {e.step: e.value for e in events}  # a step logged twice: the later value wins
    steps = sorted(points)
    return Series(np.asarray(steps, dtype=np.int64), np.asarray([points[s] for s in steps]))


def _snapshots(events: list[ea.HistogramEvent]) -> list[Snapshot]:
    latest = {e.step: e for e in events}
    return [_snapshot(latest[step]) for step in sorted(latest)]


def _snapshot(event: ea.HistogramEvent) -> Snapshot:
    h = event.histogram_value
    limits = np.asarray(h.bucket_limit, dtype=float)
    # Bucket i holds (limit[i-1], limit[i]]; the first reaches down to the minimum. Writers
    # pad with huge outer limits (±DBL_MAX), so clip to the observed range.
    edges = np.clip(np.concatenate([[h.min], limits]), h.min, h.max)
    return Snapshot(int(event.step), edges, np.asarray(h.bucket, dtype=float))
