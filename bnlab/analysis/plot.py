"""`bnlab plot`: the training-dynamics figure of one or more runs, or a listing of what they
logged; for `bnlab signal` runs, the overlay of their signal figures."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bnlab.analysis.curvature_figure import curvature_figure, read_curvature
from bnlab.analysis.events import Events, Snapshot, read_events
from bnlab.analysis.output import check_writable, figure_bytes, figure_type, write_atomic
from bnlab.analysis.runs import Run, event_files, is_run_dir, load_run, runs_under
from bnlab.analysis.summary import setting_keys, setting_of
from bnlab.analysis.training_figure import (
    GRAD_TAG,
    LINE_ROWS,
    RunData,
    plan_rows,
    training_figure,
)
from bnlab.errors import UsageError
from bnlab.probes.base import module_groups

ACT = "act/"
HIST = "act/hist/"
# Groups whose tags end in a layer name worth listing in full (what --layer accepts).
LAYER_GROUPS = tuple(module_groups())


def run_plot(
    run_dirs: list[Path],
    out: Path | None,
    layers: list[str] | None = None,
    steps: list[int] | None = None,
    list_only: bool = False,
    curvature: bool = False,
) -> None:
    """Draw the runs side by side into `out` (.png or .svg), or with `list_only` print what
    each run logged. `layers` default to a shallow, a middle and a deep watched layer;
    histogram `steps` to the first, middle and last logged (else the nearest logged). With
    `curvature`, overlay the runs' `bnlab curvature` results instead (`run_dirs` may also name
    such JSON files)."""
    if not run_dirs:
        raise UsageError("give at least one run dir to plot")
    if curvature:
        kind = _check_out(out)
        results = [read_curvature(path) for path in run_dirs]
        write_atomic(out, figure_bytes(curvature_figure(results), kind))
        print(f"Wrote figure: {out}", file=sys.stderr)
        return
    for run_dir in run_dirs:
        _check_run_dir(run_dir)
    kind = None if list_only else _check_out(out)
    loaded = [load_run(d) for d in run_dirs]
    if any(run.kind == "signal" for run in loaded):
        _plot_signal(loaded, out, kind, list_only, bool(layers or steps))
        return
    runs = [RunData(run, read_events(run.path)) for run in loaded]
    if list_only:
        for data in runs:
            print_listing(data)
        return
    for data in runs:
        if not data.events.files:
            raise UsageError(f"no event files in {data.run.path}: nothing to plot")
    chosen = choose_layers(runs, layers)
    runs = [RunData(d.run, d.events, choose_snapshots(d, chosen, steps)) for d in runs]
    rows = plan_rows(runs, chosen)
    if not rows:
        groups = dict.fromkeys(prefix.split("/", 1)[0] + "/" for prefix in LINE_ROWS)
        raise UsageError(f"nothing to plot: the runs logged none of {ACT}, {GRAD_TAG}, "
                         f"{', '.join(groups)} (were the probes off?)")
    write_atomic(out, figure_bytes(training_figure(runs, chosen, rows), kind))
    print(f"Wrote figure: {out}", file=sys.stderr)


def _plot_signal(runs: list[Run], out: Path | None, kind: str | None, list_only: bool,
                 selected: bool) -> None:
    """The overlay of signal runs (bnlab.signal.figures), one colour per run, labelled by the
    settings that differ between them."""
    from bnlab.signal.figures import overlay_figure

    for run in runs:
        if run.kind != "signal":
            raise UsageError(f"{run.path} is a training run and the others are bnlab signal "
                             "runs; plot each kind on its own")
        if not run.finished:
            raise UsageError(f"nothing to plot in {run.path}: {run.problem}")
    if selected:
        raise UsageError("--layer and --step select training probes; a signal run's figure "
                         "shows every layer")
    keys, _ = setting_keys(runs)
    labels = [" ".join(f"{k}={v}" for k, v in setting_of(run, keys).items() if v is not None)
              or run.describe() for run in runs]
    if list_only:
        for label, run in zip(labels, runs, strict=True):
            doc = run.metrics or {}
            print(f"{run.path}  {label}: bnlab signal, {len(doc.get('positions', []))} "
                  f"positions, {len(doc.get('blocks', []))} residual blocks, "
                  f"{len(doc.get('gradients', {}).get('layers', []))} gradient layers")
        return
    assert out is not None and kind is not None
    fig = overlay_figure([(label, run.metrics or {}) for label, run in
                          zip(labels, runs, strict=True)])
    write_atomic(out, figure_bytes(fig, kind))
    print(f"Wrote figure: {out}", file=sys.stderr)


def _check_run_dir(path: Path) -> None:
    if not path.exists():
        raise UsageError(f"no such directory: {path}")
    if not path.is_dir():
        raise UsageError(f"not a directory: {path} (expected a run dir)")
    if is_run_dir(path) or event_files(path):
        return
    inside = runs_under(path)
    if inside:
        raise UsageError(f"{path} is a sweep dir, not a run dir; plot its runs, e.g. {inside[0]}")
    raise UsageError(f"not a run dir: {path} (no .hydra/config.yaml, metrics.json or event files)")


def _check_out(out: Path | None) -> str:
    if out is None:
        raise UsageError("--out FILE.png or FILE.svg is required (or --list to see what "
                         "the runs logged)")
    kind = figure_type(out, "--out")
    check_writable(out, "--out")
    return kind


def choose_layers(runs: list[RunData], requested: list[str] | None) -> list[str]:
    """The layers to draw, the same for every run: the requested ones (each must be watched in
    every run), or a shallow, a middle and a deep one of the layers all runs watched."""
    watched = [d.events.layers_in(ACT) for d in runs]
    if requested:
        for layer in requested:
            for data, logged in zip(runs, watched, strict=True):
                if layer not in logged:
                    raise UsageError(
                        f"unknown layer {layer!r} in {data.run.path}; watched layers: "
                        f"{', '.join(logged) or 'none (activation probes off)'}"
                    )
        return list(dict.fromkeys(requested))
    common = [layer for layer in watched[0] if all(layer in w for w in watched)]
    if not common and any(watched):
        listed = "; ".join(f"{d.run.path}: {', '.join(w) or 'none'}"
                           for d, w in zip(runs, watched, strict=True))
        raise UsageError(f"the runs share no watched layer ({listed}); plot them one by one")
    # Layers come in logged order, which is the model's module order.
    picks = (0, len(common) // 2, len(common) - 1) if common else ()
    return list(dict.fromkeys(common[i] for i in picks))


def choose_snapshots(
    data: RunData, layers: list[str], steps: list[int] | None
) -> dict[str, list[Snapshot]]:
    """Per layer, the histograms to draw: at `steps` (nearest logged step), or the first,
    middle and last logged."""
    chosen = {}
    for layer in layers:
        snaps = data.events.histograms.get(HIST + layer, [])
        if not snaps:
            continue
        if steps is None:
            picks = [snaps[0], snaps[len(snaps) // 2], snaps[-1]]
        else:
            picks = [_nearest(snaps, step, data, layer) for step in steps]
        chosen[layer] = list({snap.step: snap for snap in picks}.values())
    if steps is not None and not chosen:
        raise UsageError(f"{data.run.path} logged no activation histograms ({HIST}*) to pick "
                         "steps from")
    return chosen


def _nearest(snaps: list[Snapshot], step: int, data: RunData, layer: str) -> Snapshot:
    first, last = snaps[0].step, snaps[-1].step
    if not first <= step <= last:
        raise UsageError(f"step {step} is outside the histogram steps {first}–{last} of "
                         f"{layer} in {data.run.path}")
    return min(snaps, key=lambda snap: abs(snap.step - step))


def print_listing(data: RunData) -> None:
    """What one run logged: tag groups, watched layers, step range, histograms."""
    console = Console(width=max(100, Console().width), highlight=False)
    run, events = data.run, data.events
    console.print(f"[bold]{run.path}[/bold]  {run.describe()}  status: {run.status}",
                  soft_wrap=True)  # a path cut in two cannot be pasted back
    span = events.steps()
    if span is None:
        console.print(f"  {len(events.files)} event files, nothing logged\n")
        return
    console.print(f"  {len(events.files)} event file(s), steps {span[0]}–{span[1]}")
    console.print(_groups_table(events))
    if events.histograms:
        console.print(_histograms_table(events))
    console.print()


def _groups_table(events: Events) -> Table:
    table = Table("group", "tags", "layers / parameters", "steps", title="scalar tags",
                  title_justify="left")
    groups: dict[str, list[str]] = {}
    for tag in events.scalars:
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    for group, tags in groups.items():
        names = events.layers_in(f"{group}/")
        shown = ", ".join(names) if group in LAYER_GROUPS else (f"{len(names)}" if names else "")
        steps = [events.scalars[t].steps for t in tags]
        span = f"{min(int(s[0]) for s in steps)}–{max(int(s[-1]) for s in steps)}"
        table.add_row(group, str(len(tags)), shown, span)
    return table


def _histograms_table(events: Events) -> Table:
    table = Table("histogram", "snapshots", "steps", title="histograms", title_justify="left")
    for tag, snaps in events.histograms.items():
        steps = [s.step for s in snaps]
        shown = ", ".join(map(str, steps)) if len(steps) <= 8 else (
            f"{', '.join(map(str, steps[:3]))}, …, {', '.join(map(str, steps[-2:]))}")
        table.add_row(tag, str(len(snaps)), shown)
    return table
