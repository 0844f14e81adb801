"""``python -m bench trial``: one defense run on one victim, the way a search trial does it.

FST at its paper defaults (10 epochs, batch 128, lr 0.01, alpha 0.2) on 2,500 clean 32x32
images, then one evaluation of 10,000 clean and 9,000 triggered images: seconds, training
images/s and evaluation images/s. On CUDA it runs twice: bf16 autocast + channels_last (the
default there) and fp32.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench._setup import Workload
from defenses import get_defense, make_config
from zoo.metrics import evaluate
from zoo.models import build_model
from zoo.runtime import Precision, use_bf16


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(w: Workload, arch: str, device: torch.device, *, precision: Precision = "auto",
             epochs: int = 10, seed: int = 0, compile: bool = False,
             warm: bool = True) -> dict[str, Any]:
    """Our trial loop: device-resident batches, one evaluation at the end (after a warm-up,
    unless ``warm`` is False). ``compile``: the model goes through ``torch.compile`` first
    (``nn.Module.compile``, in place), the optional path the issue asks to measure."""
    if warm:
        warm_up(w, arch, device, precision)
    cfg = make_config("fst", {"epochs": epochs})  # paper defaults, no per-dataset override
    model = build_model(arch, w.info)
    model.load_state_dict(w.victim)
    if compile:
        model.compile()
    sync(device)
    t0 = time.perf_counter()
    for _ in get_defense("fst").run(model, w.clean, w.info, cfg, seed=seed, device=device,
                                    precision=precision):
        pass
    sync(device)
    t1 = time.perf_counter()
    m = evaluate(model, w.test, w.triggered, w.target, w.info, device=device, precision=precision)
    sync(device)
    t2 = time.perf_counter()
    n = len(w.clean)  # DeviceLoader: full batches only, or one batch of a smaller split
    trained = epochs * max(1, n // cfg.batch_size) * min(cfg.batch_size, n)
    return {
        "arch": arch, "device": str(device), "epochs": epochs,
        "precision": (precision if precision != "auto" else
                      f"auto ({'bf16' if use_bf16(device, precision) else 'fp32'})")
        + (" + compile" if compile else ""),
        "seconds": t2 - t0, "train_seconds": t1 - t0, "eval_seconds": t2 - t1,
        "train_images_per_s": trained / (t1 - t0),
        "eval_images_per_s": (len(w.test) + len(w.triggered)) / (t2 - t1),
        "acc": m.acc, "asr": m.asr,
    }


def warm_up(w: Workload, arch: str, device: torch.device, precision: Precision) -> None:
    """One short untimed run (1 epoch on one batch, one evaluation batch): kernels chosen,
    caches and allocators filled, so the first timed precision is not charged for them."""
    cfg = make_config("fst", {"epochs": 1})
    model = build_model(arch, w.info)
    model.load_state_dict(w.victim)
    clean = w.clean.subset(torch.arange(min(len(w.clean), cfg.batch_size)))
    for _ in get_defense("fst").run(model, clean, w.info, cfg, seed=0, device=device,
                                    precision=precision):
        pass
    head = w.test.subset(torch.arange(min(len(w.test), 1024)))
    evaluate(model, head, head, w.target, w.info, device=device, precision=precision)
    sync(device)


def precisions(device: torch.device) -> list[Precision]:
    return ["bf16", "fp32"] if device.type == "cuda" else ["fp32", "bf16"]


def run_compiled(w: Workload, arch: str, device: torch.device, *, precision: Precision = "auto",
                 epochs: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """The trial with ``torch.compile``, twice in one process: the first run pays for the
    compilation (a search worker's first trial), the second reuses Dynamo's cache on a fresh
    model instance (its later trials). Compare with ``run_ours`` without ``compile``."""
    rows = []
    for label in ("first (compiles)", "second (cached)"):
        r = run_ours(w, arch, device, precision=precision, epochs=epochs, seed=seed,
                     compile=True, warm=False)
        rows.append({**r, "run": label})
    return rows
