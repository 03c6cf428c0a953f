"""Data-parallel training with torch.distributed: where a process sits in a job, and every
collective a run makes besides DDP's gradient all_reduce and SyncBatchNorm's statistics.

Launching is torch's elastic launcher's job (``torchrun --standalone --nproc_per_node=N -m
bnlab.cli train ...``, or ``bnlab train dist.nproc=N``, which hands over to it:
:func:`hand_over`), or SLURM's (``hydra/launcher=slurm``: a sweep point of several tasks is one
job, one rank per task). Each process reads its place from its launcher's environment
(:func:`env_world`) and joins the process group (:func:`start`): gloo for CPU tensors, plus
NCCL for CUDA tensors where CUDA is.

The rules of a run of several processes (one process is the plain run, untouched):

- **Rank 0 decides and writes.** It checks and locks the run dir and writes ``metrics.json``,
  TensorBoard and checkpoints; a refusal on any rank ends every rank with the same one-line
  error (:func:`agree`, :func:`from_main`), so none is left waiting in a collective.
- **Data.** ``batch_size`` is the global batch; every rank trains on its shard of the batch a
  single process would draw (``bnlab.data.train_batches``); the test set is split between
  ranks and their sums added (:func:`all_sum`).
- **Gradients** are averaged by DDP. The **buffers** of norms that normalize per process
  (``norm=custom``: per-device BN) are averaged after every step (:func:`average_buffers`):
  their running statistics are then exactly those of Ghost BN with ``virtual_batch_size`` = the
  per-rank batch. SyncBatchNorm's buffers are the same on every rank already.
- **Losses, accuracy counts and stop requests** cross ranks in one collective per host sync
  (:func:`gather_sync`): divergence and a SIGTERM stop are decided at the same step everywhere.
- **Probes** run on rank 0 only, under ``bnlab.nn.syncbn.local_statistics`` (a SyncBN layer in
  a forward that only rank 0 runs must not wait for the others).
- **Randomness.** Rank 0 draws dropout and noise from the single-process stream, rank ``r`` from
  its own (:func:`seed_rank`); checkpoints keep every rank's stream (:func:`gather_objects`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnlab.errors import UsageError
from bnlab.nn.syncbn import SyncBatchNorm
from bnlab.runtime import pick_device

T = TypeVar("T")

# What a rank other than 0 asks of Hydra: no .hydra/ files and no train.log of its own.
QUIET_RANK_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=disabled")


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: ``rank`` of ``size`` processes, and
    ``local_rank`` of the ``local_size`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


ALONE = World()  # a run of one process


def env_world() -> World:
    """The world a launcher put this process in (torchrun's ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); ``World()`` when alone. A task of a submitit (SLURM)
    job of several tasks first exports those from submitit's view of SLURM: ``MASTER_ADDR``
    the first node, ``MASTER_PORT`` from the job id, ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE``
    = ``SLURM_NTASKS``, ``LOCAL_RANK`` = ``SLURM_LOCALID`` (``TorchDistributedEnvironment``)."""
    if "WORLD_SIZE" not in os.environ and "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # (CUDA_VISIBLE_DEVICES is SLURM's business: each rank takes its local rank's GPU)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank = int(os.environ["RANK"])
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)),
                 int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def start() -> World:
    """Join the process group of this process's launcher (once; nothing when alone)."""
    world = env_world()
    if world.size > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return world


def finish() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_overrides(world: World) -> list[str]:
    """Hydra overrides for this rank: none on rank 0, :data:`QUIET_RANK_OVERRIDES` elsewhere."""
    return [] if world.main else list(QUIET_RANK_OVERRIDES)


def quiet_logging() -> None:
    """Rank 0 logs for the job: a rank whose Hydra set up logging (a SLURM task's; torchrun's
    ranks get :data:`QUIET_RANK_OVERRIDES`) drops its log file and its INFO lines."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)


def threads_per_process(world: World) -> int | None:
    """A share of this machine's cores for each of its processes (None when alone)."""
    return max(1, (os.cpu_count() or 1) // world.local_size) if world.local_size > 1 else None


# -- checks -------------------------------------------------------------------------------------


def check_world(batch_size: int, nproc: int, per_process_norm: str | None) -> None:
    """The world of this run fits its batch: ``batch_size`` splits evenly over the processes
    (``dist.nproc``, or the launcher's world), each gets at least one sample, and two where
    the norm (``per_process_norm``, its name) normalizes each process's batch on its own."""
    world = env_world()
    if world.size > 1 and nproc not in (1, world.local_size):
        raise UsageError(f"dist.nproc={nproc} disagrees with the launcher, which started "
                         f"{world.local_size} processes on this machine; leave dist.nproc=1 "
                         "under torchrun or SLURM")
    size = world.size if world.size > 1 else nproc
    what = f"dist.nproc={nproc}" if world.size == 1 else f"the world size ({size} processes)"
    if size > batch_size:
        raise UsageError(f"{what} is larger than batch_size={batch_size}: every process needs "
                         "its share of the global batch; use fewer processes or a larger batch")
    if batch_size % size:
        raise UsageError(f"batch_size={batch_size} is not divisible by {what}: every process "
                         "gets batch_size / world size samples; choose a multiple")
    if per_process_norm is not None and size > 1 and batch_size // size < 2:
        raise UsageError(f"batch_size={batch_size} over {size} processes gives each 1 sample, "
                         f"and norm={per_process_norm} normalizes each process's batch on its "
                         "own (it needs 2); use norm=sync or a larger batch_size")


def device(name: str, world: World) -> torch.device:
    """The device of ``name`` (see ``bnlab.runtime.pick_device``); with several processes on a
    machine each takes the CUDA device of its local rank."""
    picked = pick_device(name)
    if world.size == 1:
        return picked
    if picked.type == "mps":
        raise UsageError("device=mps cannot run a data-parallel job; use device=cpu")
    if picked.type == "cuda":
        if picked.index is not None and world.local_size > 1:
            raise UsageError(f"device={name} names one GPU for {world.local_size} processes; "
                             "use device=cuda (each process takes its local rank's GPU)")
        picked = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(picked)
    return picked


# -- agreeing -----------------------------------------------------------------------------------


def agree(world: World, error: UsageError | None) -> None:
    """Every rank passes its own refusal (or None); if any rank has one, every rank raises the
    first rank's: the same one line everywhere, and no rank waits for the others."""
    if world.size > 1:
        errors: list[str | None] = [None] * world.size
        dist.all_gather_object(errors, None if error is None else str(error))
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise UsageError(first) from None
    elif error is not None:
        raise error


def broadcast(world: World, obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(world: World, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; its result, or its ``UsageError``, on every rank."""
    result: Any = None
    error = None
    if world.main:
        try:
            result = fn()
        except UsageError as e:
            error = e
    agree(world, error)
    return broadcast(world, result)


def gather_objects(world: World, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


# -- collectives of the training loop ------------------------------------------------------------


def all_sum(world: World, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place."""
    if world.size > 1:
        dist.all_reduce(t)
    return t


def gather_sync(world: World, values: torch.Tensor, stop: list[int]
                ) -> tuple[torch.Tensor, int]:
    """The host sync's per-step ``[loss, correct]`` rows over the global batch, and the signal
    the job stops for (0: none). ``stop`` holds the signal this rank received, if any; the
    job's is the one any rank received, the same on all (``stop`` itself is left alone: a
    signal that reaches this rank later is still its first). Losses are averaged and counts
    summed over ranks, each rank from the same gathered rows: bit-identical everywhere."""
    signum = stop[0] if stop else 0
    if world.size == 1:
        return values, signum
    packed = torch.cat([values.flatten(), values.new_tensor([float(signum)])])
    rows = [torch.empty_like(packed) for _ in range(world.size)]
    dist.all_gather(rows, packed)
    table = torch.stack(rows)
    agreed = int(table[:, -1].max())
    if agreed and not signum:
        logging.getLogger(__name__).warning("%s received by another process: stopping",
                                            signal.Signals(agreed).name)
    summed = table[:, :-1].sum(0).view_as(values)
    return summed / summed.new_tensor([world.size, 1.0]), agreed


@torch.no_grad()
def average_buffers(world: World, model: nn.Module) -> None:
    """Average the floating-point buffers (running statistics) of every norm that normalizes
    per process over the ranks, in one all_reduce; SyncBatchNorm's are the same everywhere."""
    if world.size == 1:
        return
    buffers = [b for m in model.modules() if not isinstance(m, SyncBatchNorm)
               for b in m.buffers(recurse=False) if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().double().flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= world.size
    for b, avg in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        b.copy_(avg.view_as(b))


def wrap(model: nn.Module, world: World, dev: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (buffers are left to :func:`average_buffers`), or
    ``model`` itself when alone."""
    if world.size == 1:
        return model
    # (torch 2.14 renamed the switch; both keep DDP's one broadcast of buffers at start)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                   **no_buffer_sync)


def seed_rank(seed: int, world: World) -> None:
    """Give rank ``r > 0`` its own stream of the global RNG (dropout, noisy BN), seeded by
    ``(seed, r)``; rank 0 keeps the single-process stream."""
    if world.rank:
        key = repr(("rank", seed, world.rank)).encode()
        torch.manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big"))


# -- handing over to torch's elastic launcher -----------------------------------------------------


def hand_over(nproc: int, args: list[str]) -> int:
    """Run ``bnlab train *args`` in ``nproc`` processes on this machine through torch's elastic
    launcher, as ``torchrun --standalone --nproc_per_node=nproc -m bnlab.cli train *args``
    does, and wait for them. Returns their exit code (the first failed rank's; 128 + the
    signal's number when the launcher was stopped by one, after its processes stopped)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    threads = threads_per_process(World(size=nproc, local_size=nproc))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else the launcher warns
    # The processes print their own errors; the launcher's report of them would repeat them.
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.distributed.run")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "bnlab.cli", "train",
                        *args]))
        return 0
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code
    except SignalException as e:
        return 128 + int(e.sigval)
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
