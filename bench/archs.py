"""``python -m bench archs``: per architecture, its size and the time of one FST epoch on the CPU.

For each model of :data:`zoo.models.ARCHS` (PreAct-ResNet18 once): the parameter count and the
seconds of one FST epoch at the paper's defaults (batch 128, lr 0.01, alpha 0.2; 19 steps) on
2,500 CIFAR-shaped 3x32x32 images (the trial benchmark's digits at 32x32 RGB, drawn with
replacement), in fp32 and in the default precision ("auto": bf16 autocast on a CPU with
AMX/AVX512-BF16, fp32 elsewhere). Weights are freshly initialized (an epoch's time does not
depend on them); ViT-B/16 runs at 224 x 224, as BackdoorBench resizes its input. Each timed
epoch follows an untimed one-batch warm-up on the same model. ``steps`` > 0 times only that many
steps (``steps`` x 128 images) and scales the seconds to the epoch's 19 steps (every step has
the same batch size, so the cost per step is the same); such rows say ``steps_timed``.
``batch_size`` replaces FST's 128 where memory demands it (ViT-B/16 at 224 x 224 holds about
19 GB at 128 on the CPU); the epoch is then ``2,500 // batch_size`` steps of that size. Next to
each figure: the 1-minute load average just before it, the process's CPU seconds, and the CPU
share it got (CPU seconds / (wall seconds x torch threads)), since the machine may be shared.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import torch

from bench._setup import INFO, _draw, _to32
from defenses import get_defense, make_config
from zoo.data import Split, load_splits
from zoo.models import ALIASES, ARCHS, build_model
from zoo.runtime import Precision, use_bf16

N_CLEAN = 2500
DEFAULT_ARCHS = tuple(a for a in ARCHS if a not in ALIASES)


def clean_images(n: int = N_CLEAN, seed: int = 0) -> Split:
    """``n`` CIFAR-shaped images: digits at 32x32 RGB, drawn with replacement from ``seed``."""
    train = _to32(load_splits("digits", seed=seed).train)
    return _draw(train, n, torch.Generator().manual_seed(seed))


def load_1min() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def fst_epoch(model: torch.nn.Module, clean: Split, precision: Precision, seed: int,
              batch_size: int) -> None:
    # Paper defaults, no per-dataset override; the batch size is the paper's unless replaced.
    cfg = make_config("fst", {"epochs": 1, "batch_size": batch_size})
    for _ in get_defense("fst").run(model, clean, INFO, cfg, seed=seed, device="cpu",
                                    precision=precision):
        pass


def time_arch(arch: str, clean: Split, precision: Precision, *, seed: int = 0, steps: int = 0,
              batch_size: int = 0) -> dict[str, Any]:
    """One FST epoch of a fresh ``arch`` on ``clean`` (CPU), after a one-batch warm-up;
    ``steps`` > 0: that many steps, scaled to the epoch; ``batch_size`` 0: FST's (128)."""
    torch.manual_seed(seed)
    model = build_model(arch, INFO)
    params = sum(p.numel() for p in model.parameters())
    batch = batch_size or make_config("fst").batch_size
    epoch_steps = max(1, len(clean) // batch)  # DeviceLoader drops the last partial batch
    timed = min(steps, epoch_steps) if steps > 0 else epoch_steps
    fst_epoch(model, clean.subset(torch.arange(min(len(clean), batch))), precision, seed, batch)
    load = load_1min()
    cpu0, t0 = time.process_time(), time.perf_counter()
    fst_epoch(model, clean.subset(torch.arange(min(len(clean), timed * batch))), precision, seed,
              batch)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    del model
    gc.collect()
    seconds = wall * epoch_steps / timed
    label = precision if precision != "auto" else (
        f"auto ({'bf16' if use_bf16(torch.device('cpu'), precision) else 'fp32'})")
    return {"arch": arch, "params": params, "params_M": params / 1e6, "precision": label,
            "seconds": seconds, "images_per_s": epoch_steps * min(batch, len(clean)) / seconds,
            "batch_size": batch, "steps_timed": f"{timed}/{epoch_steps}", "load_1min": load,
            "cpu_seconds": cpu * epoch_steps / timed,
            "cpu_share": cpu / (wall * torch.get_num_threads())}


def run_archs(archs: tuple[str, ...] = DEFAULT_ARCHS, *, n_clean: int = N_CLEAN, seed: int = 0,
              precisions: tuple[Precision, ...] = ("fp32", "auto"), steps: int = 0,
              batch_size: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Rows of :func:`time_arch` for every arch and precision, one run at a time."""
    clean = clean_images(n_clean, seed)
    rows = []
    for arch in archs:
        for precision in precisions:
            row = time_arch(arch, clean, precision, seed=seed, steps=steps,
                            batch_size=batch_size)
            if progress:
                print(f"{arch} {row['precision']}: {row['seconds']:.1f} s (load "
                      f"{row['load_1min']:.2f}, CPU share {row['cpu_share']:.2f})", flush=True)
            rows.append(row)
    return rows
