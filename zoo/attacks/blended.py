"""Blended: Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning", arXiv 1712.05526 (2017); BackdoorBench's ``attack/blended.py``.

Trigger: x' = (1 - alpha) * x + alpha * P with alpha = 0.2 at train and test time, clipped and
truncated to uint8. Dirty-label, all-to-one.

Departure: BackdoorBench's P is the "Hello Kitty" JPEG. The default P here is seeded uniform
noise, integers 0..255 of shape C x H x W from ``numpy.random.default_rng(seed)`` (the
random-noise variant of the original paper): mean-grey rather than bright, with more high
frequencies, so defenses may behave differently. Pass ``image=PATH`` to blend a picture instead:
it is read with PIL, converted to the dataset's channels (L or RGB) and resized to H x W
bilinearly without keeping the aspect ratio, as BackdoorBench does. The pattern itself is part of
``state()`` (and its hash of ``params()``), so the file is not needed after the victim is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from zoo.attacks.base import Attack, to_uint8
from zoo.data import DatasetInfo

__all__ = ["Blended", "load_pattern_image", "noise_pattern"]


def noise_pattern(info: DatasetInfo, seed: int) -> torch.Tensor:
    """Seeded uniform noise, uint8 C x H x W."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(info.channels, info.size, info.size), dtype=np.uint8)
    return torch.from_numpy(arr)


def load_pattern_image(path: str | Path, info: DatasetInfo) -> torch.Tensor:
    """An image file as uint8 C x H x W in the dataset's channels and size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"blend image {str(path)!r} is not a file: expected an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as src:
            img = src.convert("L" if info.channels == 1 else "RGB")
            img = img.resize((info.size, info.size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"blend image {str(path)!r} cannot be read ({exc}): expected an image file") from None
    if info.channels not in (1, 3):
        raise ValueError(f"blend image for {info.channels}-channel images: expected 1 or 3 channels")
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _digest(pattern: torch.Tensor) -> str:
    return hashlib.sha256(pattern.contiguous().numpy().tobytes()).hexdigest()[:16]


class Blended(Attack):
    name = "blended"
    _ctor_params = ("alpha",)
    _state_names = ("pattern",)

    def __init__(
        self,
        info: DatasetInfo,
        *,
        target: int = 0,
        seed: int = 0,
        alpha: float = 0.2,
        image: str | Path | None = None,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.alpha = float(alpha)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"blended alpha {self.alpha}: expected a number in (0, 1]")
        self.source = "noise" if image is None else "image"
        self.pattern = noise_pattern(info, seed) if image is None else load_pattern_image(image, info)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "pattern": self.source, "pattern_sha256": _digest(self.pattern)}

    def _check_restored(self, params: dict[str, Any]) -> None:
        self.source = params.get("pattern", "noise")
        want = params.get("pattern_sha256")
        if want is not None and want != _digest(self.pattern):
            raise ValueError(f"blended pattern hash {_digest(self.pattern)}: expected {want} from its params")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        p = self.pattern.to(x.device, torch.float32)
        return to_uint8((1.0 - self.alpha) * x.float() + self.alpha * p)
