"""BPP: Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural
Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022;
BackdoorBench's ``attack/bpp.py`` (config ``bpp/default.yaml``).

Trigger: colour-depth squeezing, Q(x) = round(x / 255 * (q - 1)) / (q - 1) * 255 with
``squeeze_num`` q = 8, truncated to uint8. ``dithering=True`` quantizes with Floyd-Steinberg error
diffusion instead (upstream's ``floydDitherspeed``: the rounding error of each pixel goes 7/16 to
the right, 3/16 below-left, 5/16 below, 1/16 below-right), as the paper's stealthier variant;
it is off by default, as in BackdoorBench's ``default.yaml``.
Training-controlled (``dynamic``, like WaNet): every epoch a FRESH random subset of
round(rate * N) images is squeezed and relabelled to the target, and round(neg_ratio * N)
other images become "negative" samples x + (Q(x_r) - x_r), x_r a random other training image,
keeping their labels. Parameters (BackdoorBench default): q = 8, neg_ratio = 0.1, rate 0.1.

Departures: the original poisons floor(rate * B) and neg_ratio * B images of every shuffled batch;
here random subsets of the whole set are drawn per epoch (same expected rates, reproducible from
(seed, epoch)). The training augmentation is the dataset's standard crop/flip rather than the
PostTensorTransform (crop pad 5, rotation 10 degrees); the lr schedule is the zoo recipe's.
"""

from __future__ import annotations

import numpy as np
import torch

from zoo.attacks.base import Attack, poison_count, to_uint8
from zoo.data import DatasetInfo, Split

__all__ = ["BPP", "floyd_steinberg", "squeeze"]


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q(x) as float on the 0..255 scale (not yet truncated)."""
    step = levels - 1
    return torch.round(x.float() / 255.0 * step) / step * 255.0


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q(x) with Floyd-Steinberg error diffusion, float on the 0..255 scale; pixels are visited in
    raster order, each step vectorized over images and channels."""
    img = x.to(torch.float64).clone()
    height, width = img.shape[-2:]
    step = levels - 1
    for i in range(height):
        for j in range(width):
            old = img[..., i, j].clone()
            new = (torch.round(old / 255.0 * step) / step * 255.0).clamp(0.0, 255.0)
            img[..., i, j] = new
            err = old - new
            if j + 1 < width:
                img[..., i, j + 1] += err * (7 / 16)
            if i + 1 < height:
                if j > 0:
                    img[..., i + 1, j - 1] += err * (3 / 16)
                img[..., i + 1, j] += err * (5 / 16)
                if j + 1 < width:
                    img[..., i + 1, j + 1] += err * (1 / 16)
    return img.float()


class BPP(Attack):
    name = "bpp"
    dynamic = True
    _ctor_params = ("squeeze_num", "neg_ratio", "dithering")

    def __init__(
        self, info: DatasetInfo, *, target: int = 0, seed: int = 0, squeeze_num: int = 8, neg_ratio: float = 0.1,
        dithering: bool = False,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.squeeze_num, self.neg_ratio = int(squeeze_num), float(neg_ratio)
        self.dithering = bool(dithering)
        if not 2 <= self.squeeze_num <= 255:
            raise ValueError(f"bpp squeeze_num {self.squeeze_num}: expected 2..255 colour levels")
        if not 0.0 <= self.neg_ratio < 1.0:
            raise ValueError(f"bpp neg_ratio {self.neg_ratio}: expected a number in [0, 1)")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x), float on the 0..255 scale: plain rounding or Floyd-Steinberg dithering."""
        return floyd_steinberg(x, self.squeeze_num) if self.dithering else squeeze(x, self.squeeze_num)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(self.quantize(x))

    def _counts(self, n: int, poison_rate: float) -> tuple[int, int]:
        n_bd, n_neg = poison_count(n, poison_rate), round(self.neg_ratio * n)
        if n_bd + n_neg > n:
            raise ValueError(
                f"bpp poison rate {poison_rate} with neg_ratio {self.neg_ratio} needs {n_bd + n_neg} of {n} images: "
                f"expected --poison-rate <= {1 - self.neg_ratio:.3f}"
            )
        return n_bd, n_neg

    def check(self, train: Split, poison_rate: float) -> None:
        self._counts(len(train), poison_rate)

    def training_set(self, train: Split, *, poison_rate: float, epoch: int, seed: int) -> Split:
        """A fresh squeezed subset (relabelled) and negative subset (labels kept) for ``epoch``."""
        n = len(train)
        n_bd, n_neg = self._counts(n, poison_rate)
        rng = np.random.default_rng([seed, epoch, 7])
        perm = rng.permutation(n)
        dev = train.x.device
        bd = torch.from_numpy(perm[:n_bd]).to(dev)
        neg = torch.from_numpy(perm[n_bd : n_bd + n_neg]).to(dev)
        partners = torch.from_numpy(rng.integers(0, n, size=n_neg)).to(dev)
        x, y = train.x.clone(), train.y.clone()
        x[bd] = self.apply(x[bd])
        y[bd] = self.target
        if n_neg:
            other = train.x[partners].float()
            x[neg] = to_uint8(train.x[neg].float() + self.quantize(other) - other)
        return Split(x, y)
