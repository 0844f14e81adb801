"""WaNet: Nguyen, Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack", ICLR 2021;
BackdoorBench's ``attack/wanet.py`` (config ``wanet/default.yaml``).

Trigger, fixed per attack (k = 4, s = 0.5, grid_rescale = 1):
- field F: U(-1, 1) of shape 2 x k x k, divided by its mean absolute value, upsampled bicubically
  (align_corners) to H x W;
- identity grid I: linspace(-1, 1, H) in (x = column, y = row) order, as grid_sample expects;
- warp grid G = clamp((I + s * F / H) * grid_rescale, -1, 1);
- x' = grid_sample(x, G, bilinear, align_corners=True).
Training ("noise" mode, cross_ratio 2): every epoch a FRESH random subset of round(rate * N)
images is warped with G and relabelled to the target, and round(cross_ratio * that) other images
are warped with G + U(-1, 1)/H (fresh noise per image, clamped) and keep their labels, so the
network learns that only the exact warp means "target".

Departures: the original poisons the first floor(rate * B) images of every shuffled batch; here a
random subset of the whole set is drawn per epoch (the same expected rate, reproducible from
(seed, epoch)). The warp runs on raw 0..255 floats and is truncated to uint8 like every trigger
here (the original warps normalized floats), and the training augmentation is the dataset's
standard crop/flip rather than WaNet's crop(pad 5) + rotation(10 degrees) post-transform.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from zoo.attacks.base import Attack, poison_count, to_uint8
from zoo.data import DatasetInfo, Split

__all__ = ["WaNet", "identity_grid", "warp_field"]


def warp_field(k: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """The upsampled random field F, float32 1 x H x W x 2."""
    field = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    field = field / field.abs().mean()
    up = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True)
    return up.permute(0, 2, 3, 1).contiguous()


def identity_grid(size: int) -> torch.Tensor:
    """1 x H x W x 2 grid whose [..., 0] is the column (x) and [..., 1] the row (y) coordinate."""
    axis = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack((cols, rows), dim=2)[None]


class WaNet(Attack):
    name = "wanet"
    dynamic = True
    _ctor_params = ("k", "s", "grid_rescale", "cross_ratio")
    _state_names = ("noise_grid",)

    def __init__(
        self,
        info: DatasetInfo,
        *,
        target: int = 0,
        seed: int = 0,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.k, self.s = int(k), float(s)
        self.grid_rescale, self.cross_ratio = float(grid_rescale), float(cross_ratio)
        if not 2 <= self.k <= info.size:
            raise ValueError(f"wanet k {self.k}: expected 2..{info.size} control points")
        if self.cross_ratio < 0 or self.s < 0:
            raise ValueError(f"wanet s {self.s}, cross_ratio {self.cross_ratio}: expected both >= 0")
        self.noise_grid = warp_field(self.k, info.size, torch.Generator().manual_seed(self.seed))

    def grid(self) -> torch.Tensor:
        """The warp grid G, 1 x H x W x 2."""
        h = self.info.size
        return ((identity_grid(h) + self.s * self.noise_grid / h) * self.grid_rescale).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(x.device).expand(len(x), -1, -1, -1)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return to_uint8(out)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self._warp(x, self.grid())

    def _counts(self, n: int, poison_rate: float) -> tuple[int, int]:
        n_bd = poison_count(n, poison_rate)
        n_cross = int(n_bd * self.cross_ratio)
        if n_bd + n_cross > n:
            raise ValueError(
                f"wanet poison rate {poison_rate} with cross_ratio {self.cross_ratio} needs {n_bd + n_cross} "
                f"of {n} images: expected --poison-rate <= {1 / (1 + self.cross_ratio):.3f}"
            )
        return n_bd, n_cross

    def check(self, train: Split, poison_rate: float) -> None:
        self._counts(len(train), poison_rate)

    def training_set(self, train: Split, *, poison_rate: float, epoch: int, seed: int) -> Split:
        """A fresh poisoned + noise-warped subset for ``epoch``, reproducible from (seed, epoch)."""
        n = len(train)
        n_bd, n_cross = self._counts(n, poison_rate)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        dev = train.x.device
        bd = torch.from_numpy(perm[:n_bd]).to(dev)
        cross = torch.from_numpy(perm[n_bd : n_bd + n_cross]).to(dev)
        x, y = train.x.clone(), train.y.clone()
        x[bd] = self.apply(x[bd])
        y[bd] = self.target
        if n_cross:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            # Fresh noise per image, U(-1, 1) / H, on top of the fixed warp.
            noise = (torch.rand(n_cross, self.info.size, self.info.size, 2, generator=gen) * 2 - 1) / self.info.size
            x[cross] = self._warp(x[cross], (self.grid() + noise).clamp(-1, 1))
        return Split(x, y)
