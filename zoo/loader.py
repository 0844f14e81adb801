"""Device-resident batches: one uint8 tensor per split, augmentation done per batch on device.

No DataLoader workers and no PIL: a batch is an index into the resident tensor, a random crop
(pad then crop at a per-image offset, as ``RandomCrop(size, padding)``) and an optional
horizontal flip, both vectorized over the batch, then conversion to float and normalization.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from zoo.data import DatasetInfo, Split
from zoo.runtime import to_device_layout

__all__ = ["DeviceLoader", "augment", "channel_stats", "normalize"]


@functools.lru_cache(maxsize=64)  # a few datasets x devices x dtypes per process
def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean`` and ``std`` as 1,C,1,1 tensors on ``device``, built once per
    (values, device, dtype): building them from Python floats on every batch is a blocking
    host-to-device copy on CUDA (a synchronisation per batch). Callers must not modify them."""
    # Normal tensors even when first asked for under inference_mode: an inference tensor
    # could not be saved for a later backward pass (to_model_input differentiates through it).
    with torch.inference_mode(False), torch.no_grad():
        m = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1).to(device)
        s = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1).to(device)
    return m, s


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 N,C,H,W -> float, scaled to [0, 1] then standardized per channel."""
    mean, std = channel_stats(info.mean, info.std, x.device)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, info: DatasetInfo, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``info.pad`` and, where allowed, a horizontal flip."""
    n, c, h, w = x.shape
    p = info.pad
    dev = x.device
    if p > 0:
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
        batch = torch.arange(n, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if info.hflip:
        flip = torch.rand(n, generator=generator, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Shuffled, augmented, normalized batches from a split that lives on ``device``.

    Training batches (``train=True``): with ``drop_last`` (the default: victim training, as
    BackdoorBench's attack scripts, e.g. ``attack/badnet.py``, ``drop_last=True``) the last
    incomplete batch is dropped, so every batch has the same shape; without it (the default of
    ``torch.utils.data.DataLoader``, which the defenses' reference loops keep) it is kept:
    ``ceil(n / batch_size)`` batches a pass. A split smaller than one batch is one batch either
    way. Evaluation batches (``train=False``) hold every image, in order.
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        *,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        train: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected >= 1")
        self.split = split.to(device)
        self.info = info
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.drop_last = drop_last
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(len(self.split), self.batch_size)
        every = full + (rest > 0)  # every image, the last batch partial
        if not self.train:
            return every
        return max(1, full if self.drop_last else every)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if self.train:
            order = torch.randperm(n, generator=self.generator, device=self.device)
            bs = min(self.batch_size, n)
        else:
            order = torch.arange(n, device=self.device)
            bs = self.batch_size
        for i in range(len(self)):
            idx = order[i * bs : (i + 1) * bs]
            x = self.split.x[idx]
            if self.train:
                x = augment(x, self.info, self.generator)
            x = normalize(x, self.info)
            x = to_device_layout(x)
            yield x, self.split.y[idx]
