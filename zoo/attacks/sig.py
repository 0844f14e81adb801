"""SIG: Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019; BackdoorBench's ``attack/sig.py`` and ``bd_img_transform/sig.py``.

Trigger: an additive horizontal sinusoid, the same in every row and channel,
v(i, j) = delta * sin(2 * pi * j * f / W), with delta = 40 (0..255 scale) and f = 6;
x' = clip(x + v, 0, 255) truncated to uint8. Clean-label: only target-class training images get
the signal and keep their label; the rate is counted against the whole training set.

Departure: none in the trigger. At f = 6 a 16x16 image (digits) holds 6 periods in 16 columns,
still below the Nyquist limit of 8. See ``zoo.attacks.base`` for the clean-label count rule.
"""

from __future__ import annotations

import math

import torch

from zoo.attacks.base import Attack, to_uint8
from zoo.data import DatasetInfo

__all__ = ["SIG", "sig_pattern"]


def sig_pattern(width: int, delta: float, f: float) -> torch.Tensor:
    """The 1-D signal over columns, float64: delta * sin(2 pi j f / W)."""
    j = torch.arange(width, dtype=torch.float64)
    return delta * torch.sin(2.0 * math.pi * j * f / width)


class SIG(Attack):
    name = "sig"
    clean_label = True
    _ctor_params = ("delta", "f")
    _state_names = ("signal",)

    def __init__(
        self, info: DatasetInfo, *, target: int = 0, seed: int = 0, delta: float = 40.0, f: float = 6.0
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.delta, self.f = float(delta), float(f)
        if self.delta <= 0 or self.f <= 0:
            raise ValueError(f"sig delta {self.delta}, f {self.f}: expected both > 0")
        self.signal = sig_pattern(info.size, self.delta, self.f)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(x.to(torch.float64) + self.signal.to(x.device))
