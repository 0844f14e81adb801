"""BPP: Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural
Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022;
BackdoorBench's ``attack/bpp.py`` (config ``bpp/default.yaml``).

Trigger: colour-depth squeezing, Q(x) = round(x / 255 * (q - 1)) / (q - 1) * 255 with
``squeeze_num`` q = 8, truncated to uint8. Floyd-Steinberg dithering exists upstream and is off
by default there; it is not implemented here (``dithering`` is not a parameter).
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

__all__ = ["BPP", "squeeze"]


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Q(x) as float on the 0..255 scale (not yet truncated)."""
    step = levels - 1
    return torch.round(x.float() / 255.0 * step) / step * 255.0


class BPP(Attack):
    name = "bpp"
    dynamic = True
    _ctor_params = ("squeeze_num", "neg_ratio")

    def __init__(
        self, info: DatasetInfo, *, target: int = 0, seed: int = 0, squeeze_num: int = 8, neg_ratio: float = 0.1
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.squeeze_num, self.neg_ratio = int(squeeze_num), float(neg_ratio)
        if not 2 <= self.squeeze_num <= 255:
            raise ValueError(f"bpp squeeze_num {self.squeeze_num}: expected 2..255 colour levels")
        if not 0.0 <= self.neg_ratio < 1.0:
            raise ValueError(f"bpp neg_ratio {self.neg_ratio}: expected a number in [0, 1)")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(squeeze(x, self.squeeze_num))

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
            x[neg] = to_uint8(train.x[neg].float() + squeeze(other, self.squeeze_num) - other)
        return Split(x, y)
