"""``bnlab signal``: measure a model's signal propagation at initialization (or at a training
run's checkpoint) over a few seeds and batches, without training, and write ``signal.json`` and
its figures to the run dir.

The config is ``configs/signal.yaml``: the ``data``, ``model`` and ``norm`` groups of
``bnlab train``, the top-level keys below (:class:`SignalConfig`) and the ``signal`` group
(:class:`SignalOptions`). Seed s (of ``seed``, ``seed + 1``, ...) builds the model as ``bnlab
train seed=s`` does and measures it on the first ``signal.batches`` training batches that run
would see (its order and augmentation). With ``signal.checkpoint`` every seed loads the same
trained weights; the seeds then vary only the batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from pydantic import Field
from torch import nn

from bnlab import data as datasets
from bnlab import registry
from bnlab.config import meta_model
from bnlab.errors import UsageError
from bnlab.registry import Schema, check
from bnlab.rundir import HYDRA_DIR, METRICS, SIGNAL, norm_placement, run_dir_lock, write_json
from bnlab.runtime import memory_format, pick_device
from bnlab.signal.collect import BatchSignal, measure_batch
from bnlab.signal.positions import gradient_layers, positions, residual_blocks
from bnlab.signal.report import read_signal, signal_document

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
# The model's keys a comparison of signal runs shows, when the model has them.
MODEL_KEYS = ("depth", "width", "blocks", "residual", "weight_std", "alpha")


class SignalConfig(Schema):
    """The top-level keys of ``bnlab signal``."""

    seed: int = Field(description="the first seed (model init and batches); signal.seeds counts "
                      "up from it")
    batch_size: int = Field(ge=2, description="an integer >= 2 (BN needs 2+ samples)")
    threads: int | None = Field(ge=1)
    device: str = Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto, cpu, cuda, cuda:N or mps")
    channels_last: Literal["auto"] | bool
    deterministic: bool
    overwrite: bool


class SignalOptions(Schema):
    """The ``signal`` group's keys."""

    seeds: int = Field(ge=1, description="model inits measured: seed, seed + 1, ...")
    batches: int = Field(ge=1, description="training batches measured per seed")
    samples: int = Field(ge=2, description="samples in each sample Gram matrix: the first N of "
                         "each batch (2 <= N <= batch_size)")
    checkpoint: str | None = Field(description="a bnlab train run dir whose checkpoint.pt is "
                                   "measured instead of the initial weights; null: at init")


def validate(cfg: DictConfig) -> None:
    """Raise ``UsageError`` naming the first bad value of a ``bnlab signal`` config."""
    check(SignalConfig, OmegaConf.masked_copy(cfg, list(SignalConfig.model_fields)))
    options = cast(SignalOptions, check(SignalOptions, cfg.signal, "signal"))
    registry.build("data", cfg.data)
    model = meta_model(cfg)
    if options.samples > cfg.batch_size:
        raise UsageError(f"signal.samples={options.samples} is more than batch_size="
                         f"{cfg.batch_size}: the Gram matrix is taken over the first "
                         "signal.samples samples of a batch; use signal.samples <= batch_size")
    if options.checkpoint is not None:
        check_checkpoint(Path(options.checkpoint), model, cfg)


def _run_choice(run_dir: Path) -> str:
    """``model=... norm=...`` of the run in ``run_dir``, as its .hydra/config.yaml says."""
    try:
        composed = yaml.safe_load((run_dir / HYDRA_DIR / "config.yaml").read_text())
        return f"model={composed['model']['name']} norm={composed['norm']['name']}"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "an unknown model"


def read_checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict of the run in ``run_dir`` (CPU tensors, plain data only)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"signal.checkpoint={run_dir}: no {CHECKPOINT} there; give the run dir "
                         "of a bnlab train run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # a truncated or foreign file: say so
        raise UsageError(f"signal.checkpoint={run_dir}: cannot read {CHECKPOINT} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    return state


def check_checkpoint(run_dir: Path, model: nn.Module, cfg: DictConfig) -> None:
    """The checkpoint must hold exactly this config's model: the same keys, the same shapes."""
    state = read_checkpoint(run_dir)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        found = "; ".join(f"{what} {len(keys)} (e.g. {keys[0]})" for what, keys in
                          (("missing keys", missing), ("unexpected keys", unexpected),
                           ("other shapes", shapes)) if keys)
        raise UsageError(f"signal.checkpoint={run_dir} holds a checkpoint of another model "
                         f"({_run_choice(run_dir)}; this config builds model={cfg.model.name} "
                         f"norm={cfg.norm.name}: {found}); pass that run's model and norm "
                         "overrides")


def check_signal_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run dir that holds a training run, or a measurement unless ``overwrite``."""
    if (run_dir / METRICS).exists():
        raise UsageError(f"{run_dir} holds a bnlab train run ({METRICS}); measure it with "
                         f"signal.checkpoint={run_dir} and another hydra.run.dir")
    if (run_dir / SIGNAL).exists() and not cfg.overwrite:
        raise UsageError(f"{run_dir} already holds a signal measurement ({SIGNAL}); pass "
                         "overwrite=true to measure again or choose another hydra.run.dir")


def summary_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved values a comparison of signal runs needs, flat."""
    config = {"norm": cfg.norm.name, "model": cfg.model.name}
    config |= {k: cfg.model[k] for k in MODEL_KEYS if k in cfg.model}
    config |= {"seed": cfg.seed, "batch_size": cfg.batch_size, "data": cfg.data.name,
               "checkpoint": cfg.signal.checkpoint, **norm_placement(cfg)}
    return OmegaConf.to_container(OmegaConf.create(config), resolve=True)  # type: ignore[return-value]


def build_model(cfg: DictConfig, seed: int, device: torch.device,
                state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The model as ``bnlab train seed=<seed>`` builds it (or with the checkpoint's weights)."""
    torch.manual_seed(seed)
    model = registry.build("model", cfg.model).build(registry.build("norm", cfg.norm))
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, memory_format=memory_format(cfg, device))


def forward_seed(seed: int, batch: int) -> int:
    """The RNG seed of the measuring forward of batch ``batch`` of seed ``seed`` (dropout
    masks, BN noise): distinct pairs give unrelated streams."""
    digest = hashlib.blake2b(repr(("signal", seed, batch)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def measure(cfg: DictConfig) -> tuple[list[BatchSignal], nn.Module]:
    """Every seed's and batch's measurement, and the last seed's model (for its structure)."""
    device = pick_device(cfg.device)
    data = datasets.load(cfg.data, device, cfg.seed)
    opts = cfg.signal
    if datasets.steps_per_epoch(data, cfg.batch_size) < opts.batches:
        raise UsageError(f"signal.batches={opts.batches} of batch_size={cfg.batch_size} need "
                         f"{opts.batches * cfg.batch_size} training images; the training set has "
                         f"{len(data.train)}")
    state = read_checkpoint(Path(opts.checkpoint)) if opts.checkpoint else None
    fmt = memory_format(cfg, device)
    results = []
    for seed in range(cfg.seed, cfg.seed + opts.seeds):
        model = build_model(cfg, seed, device, state)
        where = positions(model), residual_blocks(model), gradient_layers(model)
        batches = datasets.train_batches(data, cfg.batch_size, seed, 0, 0, 0, cfg.data.augment)
        for number, (x, y) in zip(range(opts.batches), batches, strict=False):
            x = x.contiguous(memory_format=fmt)
            results.append(measure_batch(model, x, y, *where, samples=opts.samples,
                                         seed=forward_seed(seed, number)))
        log.info("seed %d: %d batches measured", seed, opts.batches)
    return results, model


def run(cfg: DictConfig, run_dir: Path, locked: bool = False) -> dict[str, Any]:
    """Measure and write ``signal.json`` and the figures to ``run_dir``; returns the
    document. ``locked``: the caller already holds the run dir's lock."""
    from bnlab.signal.figures import RUN_FIGURES, write_run_figures  # matplotlib: only here

    validate(cfg)
    with contextlib.nullcontext() if locked else run_dir_lock(run_dir):
        check_signal_dir(cfg, run_dir)
        for name in (SIGNAL, *(f"{figure}.png" for figure in RUN_FIGURES)):
            (run_dir / name).unlink(missing_ok=True)  # overwrite=true: no stale result
        start = time.perf_counter()
        results, model = measure(cfg)
        settings = {"seeds": list(range(cfg.seed, cfg.seed + cfg.signal.seeds)),
                    "batches": cfg.signal.batches, "samples": cfg.signal.samples,
                    "batch_size": cfg.batch_size, "checkpoint": cfg.signal.checkpoint}
        document = signal_document(results, positions(model), residual_blocks(model),
                                   gradient_layers(model), summary_config(cfg), settings)
        document["wall_time_s"] = round(time.perf_counter() - start, 3)
        write_json(run_dir / SIGNAL, document)
        write_run_figures(run_dir, document)
    return document


def signal_summary(run_dir: Path) -> list[str]:
    """The end of a ``bnlab signal`` job: its headline numbers, time, and where to look (nothing
    when it wrote no ``signal.json``)."""
    document = read_signal(run_dir)
    if document is None:
        return []
    s = document["summary"]

    def show(key: str) -> str:
        value = s[key]["mean"]
        return "–" if value is None else f"{value:.3g}"

    line = (f"measured: gradient growth ×{show('grad_growth')}/layer toward the input, "
            f"deepest slot: cos sim {show('cos_sim_deepest')}, stable rank "
            f"{show('stable_rank_deepest')}")
    if document["blocks"]:
        line += f", last block branch/skip variance {show('branch_skip_last_block')}"
    return [f"{line}; {document.get('wall_time_s', 0):.1f} s, run dir {run_dir}",
            f"  look at it: {run_dir / 'spp.png'}, gram.png, gradients.png   |   "
            f"bnlab plot {run_dir} --out overlay.png"]


def signal_sweep_summary(sweep_dir: Path) -> list[str]:
    """The end of a ``bnlab signal`` sweep: where it is and how to look at it."""
    return [f"sweep done: {sweep_dir}",
            f"  compare: bnlab compare {sweep_dir}   |   overlay: bnlab plot {sweep_dir}/*/ "
            f"--out {sweep_dir / 'overlay.png'}"]
