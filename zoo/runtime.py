"""Device choice, seeding and mixed precision, shared by victim training and every defense.

channels_last everywhere: convolutions in NHWC run faster on CUDA (cuDNN) and on CPU (oneDNN),
with the same results (bench/README.md).

``precision="auto"`` means bf16 autocast where the hardware computes in bf16 natively: an NVIDIA
GPU of compute capability 8.0 or above (Ampere on; ``torch.cuda.is_bf16_supported()`` also says
yes on a V100 or T4, which emulate it, slower than fp32), a ROCm GPU that supports it, or a CPU
with AMX or AVX512-BF16. Elsewhere (an AVX2-only CPU, where bf16
is emulated and slower) "auto" is fp32. ``"fp32"`` and ``"bf16"`` force one or the other
(``--precision``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import random
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

__all__ = ["BUILD_THREADS", "PRECISIONS", "JobMap", "Precision", "SerialMap", "autocast",
           "cpu_has_native_bf16", "cuda_has_native_bf16", "eval_batch_size", "eval_mode", "in_order",
           "keep_freed_memory", "pick_device", "prepare_model", "reproducible_precision", "seed_everything",
           "stored_work_threads", "to_device_layout", "use_bf16"]

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)

_ModelT = TypeVar("_ModelT", bound=torch.nn.Module)


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU. An explicit "cuda" without CUDA fails."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} requested but CUDA is not available: expected 'cpu' or 'auto'")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@functools.cache  # a fact of the machine, asked on every batch
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)  # private probes; absent in some builds
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


NATIVE_BF16_CAPABILITY = (8, 0)  # NVIDIA Ampere (A100) and later have bf16 tensor cores


def cuda_has_native_bf16(device: torch.device) -> bool:
    """True where the CUDA device computes bf16 in hardware: compute capability >= 8.0 on
    NVIDIA; on ROCm (no such capability), what torch reports without emulation."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY


def use_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return cuda_has_native_bf16(device)
        return device.type == "cpu" and cpu_has_native_bf16()
    return precision == "bf16"


def reproducible_precision(device: torch.device, precision: Precision = "auto") -> Precision:
    """``precision`` for work whose result is stored and must not depend on the CPU's bf16
    support (victims, attack artefacts): "auto" becomes fp32 on CPU; CUDA keeps "auto"."""
    return "fp32" if precision == "auto" and device.type == "cpu" else precision


BUILD_THREADS = 1  # intra-op threads of stored work on the CPU (see stored_work_threads)


@contextlib.contextmanager
def stored_work_threads(device: torch.device) -> Iterator[None]:
    """Run stored work (a victim's build) on the CPU with ``BUILD_THREADS`` torch threads, then
    restore the count. A CPU matmul or convolution sums in an order set by its thread count, and
    training carries the difference on: measured, the same digits victim built with 1 and 2
    threads had different weights. Fixed, the weights depend on the key alone, whether the
    driver (``zoo``), a Ray task (``--cpus-per-trial`` threads) or another machine builds it."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode, then each module back in its own mode. A defense that trains a
    part (the head, the last block) keeps the rest in eval mode: ``model.train(was_training)``
    would put every module in one mode, so a measurement between epochs would change how the
    next epoch trains (the trained part's BatchNorm frozen, or the frozen part's updating)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.train(mode)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision = "auto") -> Iterator[None]:
    """bf16 autocast where chosen, a no-op otherwise."""
    if use_bf16(device, precision):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def prepare_model(model: _ModelT, device: torch.device) -> _ModelT:
    """Move to ``device`` in channels_last; on CUDA let cuDNN pick its fastest kernels."""
    model = model.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model


def to_device_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch of images in the layout the prepared models run fastest on (channels_last)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def eval_batch_size(device: torch.device) -> int:
    """Images per evaluation batch: large on CUDA (fewer launches); 128 on CPU, where a batch's
    activations stay in the caches and below the size at which glibc maps a thread's blocks
    afresh on every call (a search trial runs in a thread of its worker)."""
    return 1024 if device.type == "cuda" else 128


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


@functools.cache  # a process setting: applied once; later calls (each trial) are free
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 1 GiB for reuse, as CUDA's caching
    allocator does, instead of handing them back to the kernel.

    By default glibc serves each block above 32 MiB with a fresh ``mmap`` and unmaps it on
    ``free``: a PreAct-ResNet18 batch of 128 has 32 MiB activations, so every training step
    would page-fault and zero its memory anew (``python -m bench allocator``). A process
    setting, like torch's thread count: call it once from a command's entry point or a worker.
    Returns False (and changes nothing) off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


class JobMap(Protocol):
    """Runs independent jobs (victim builds, final evaluations): ``fn(*job, device=..., **shared)``
    for each job, yielding ``(index, result)`` as each finishes. ``shared`` holds what every job
    reads (the splits): sent once. ``cpu_seconds``: the CPU time the jobs have taken so far.
    :class:`SerialMap` runs them here; ``tuner.trainable.RayMap`` as Ray tasks."""

    @property
    def cpu_seconds(self) -> float: ...

    def __call__(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], **shared: Any
                 ) -> Iterator[tuple[int, Any]]: ...


def in_order(jobs: JobMap, fn: Callable[..., Any], args: Sequence[tuple[Any, ...]], **shared: Any
             ) -> list[Any]:
    """``jobs``' results of ``fn`` on each of ``args``, in the order of ``args`` (jobs finish in
    any order)."""
    done = dict(jobs(fn, args, **shared))
    return [done[i] for i in range(len(args))]


class SerialMap:
    """Jobs one after another in this process, on ``device`` (the path without Ray:
    ``python -m tuner zoo``, ``evaluate``)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cpu_seconds = 0.0

    def __call__(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], **shared: Any
                 ) -> Iterator[tuple[int, Any]]:
        for i, job in enumerate(jobs):
            start = time.process_time()
            try:
                result = fn(*job, device=self.device, **shared)
            finally:
                self.cpu_seconds += time.process_time() - start
            yield i, result
