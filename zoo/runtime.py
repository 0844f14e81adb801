"""Device choice, seeding and mixed precision, shared by victim training and every defense.

bf16 autocast and channels_last are used on CUDA. On CPU the default is fp32: bf16 autocast on
CPU is only faster for large convolutions (measured in ``bench/``) and it changes results, so it
is opt-in there (``precision="bf16"``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["Precision", "autocast", "pick_device", "prepare_model", "seed_everything"]

Precision = str  # "auto" | "fp32" | "bf16"
PRECISIONS = ("auto", "fp32", "bf16")


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


def use_bf16(device: torch.device, precision: Precision = "auto") -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision = "auto") -> Iterator[None]:
    """bf16 autocast where chosen, a no-op otherwise."""
    if use_bf16(device, precision):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move to ``device``; channels_last on CUDA, where it is faster for convolutions."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model
