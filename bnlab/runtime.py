"""Where and how a run executes: process setup, device, memory format, compilation, memory use,
and stopping cleanly on SIGINT/SIGTERM.

:func:`setup_process` changes the whole process (threads, deterministic kernels, glibc's
allocator), so only the CLI calls it, once, before training; the training loop itself never
changes process state beyond seeding its own generators.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable, Iterator

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils import deterministic

from bnlab.errors import UsageError

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's codes for a signal death


def setup_process(cfg: DictConfig) -> None:
    """Process-wide settings of a training process, set once by the CLI before the first run
    (library callers of :func:`bnlab.train.run` choose their own): threads, determinism, seed,
    and glibc's allocator."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:  # cuBLAS is deterministic only with this (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (a guard against reads of
    # uninitialized memory): an extra write of every activation, a sizeable share of a CPU
    # step (docs/benchmarks.md), and no op here reads such memory (weights are bit-identical
    # with and without the fill).
    deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not cfg.deterministic
    keep_freed_memory()


MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
              "GLIBC_TUNABLES")


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse the memory of freed activations instead of handing it back to
    the OS and faulting it in again at the next step. By default a block at or above the
    (dynamic) mmap threshold gets fresh pages and the heap top is trimmed past the trim
    threshold; with a CPU step's multi-megabyte tensors that is thousands of page faults per
    step, a measurable share of a ``model=cnn`` step (docs/benchmarks.md), for no gain in peak
    RSS. The threshold cannot go above 32 MiB, and a (128, 64, 32, 32) float32 activation
    (VGG's first stage) is just above it, so mmap is switched off for blocks the heap can hold
    (glibc still mmaps what a thread's arena cannot hold). Setting any of
    ``MALLOC_ENV`` leaves malloc as the user configured it;
    ``GLIBC_TUNABLES=glibc.malloc.tcache_count=7`` (a default value) keeps glibc's default
    behaviour."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_ENV):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc-like
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)  # large blocks come from the heap too (the mmap threshold is moot)
    mallopt(m_trim_threshold, 512 << 20)


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count()
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"device={name} is not available: this machine has {count} CUDA "
                             "device(s); use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device=mps is not available on this machine; use device=auto or cpu")
    return torch.device(name)


def memory_format(cfg: DictConfig, device: torch.device) -> torch.memory_format:
    """The layout of conv weights and batches. ``auto`` is NHWC on CPU, where every model trained
    faster with it (CPU max-pooling in NCHW is slow; docs/benchmarks.md),
    and on CUDA with ``amp`` (tensor-core convs want NHWC); NCHW elsewhere."""
    nhwc = cfg.channels_last
    if nhwc == "auto":
        nhwc = device.type == "cpu" or (device.type == "cuda" and cfg.amp)
    return torch.channels_last if nhwc else torch.contiguous_format


def compile_model(model: nn.Module, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of ``model`` (``compile=true``). On CPU, random numbers come from ATen's
    generators (Inductor's ``fallback_random``): Inductor's own CPU random kernels made a
    compiled noisy-BN cnn step slower than eager (docs/benchmarks.md), and with ATen's compiled
    runs draw exactly the noise and dropout masks of eager ones."""
    return torch.compile(model, options={"fallback_random": True} if device.type == "cpu" else None)


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ``ru_maxrss`` also counts the
    parent's resident memory at fork (a launcher's, a benchmark's) when that was larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, else KiB


@contextlib.contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """Turn the first SIGINT/SIGTERM into a request to stop at the next safe point (the list
    receives the signal number); a second one interrupts at once."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # signals go to main only
        yield received
        return
    old = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield received
    finally:
        for s, h in old.items():
            signal.signal(s, h)
