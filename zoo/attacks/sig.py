"""SIG: Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019; BackdoorBench's ``attack/sig.py`` and ``bd_img_transform/sig.py``.

Trigger: an additive horizontal sinusoid, the same in every row and channel,
v(i, j) = delta * sin(2 * pi * j * f / W), with delta = 40 (0..255 scale) and f = 6;
x' = clip(x + v, 0, 255) truncated to uint8. Clean-label: only target-class training images get
the signal and keep their label; the rate is counted against the whole training set.

``test_delta`` is the signal's strength at test time (default: ``delta``, as BackdoorBench).
The paper itself trains with one strength and tests with a larger one (its Delta_tr and
Delta_ts), because the network learns the signal's presence, not its amplitude.

Departure: none in the trigger. At f = 6 a 16x16 image (digits) holds 6 periods in 16 columns,
still below the Nyquist limit of 8. See ``zoo.attacks.base`` for the clean-label count rule.
On digits the zoo's defaults (``zoo.attacks.DATASET_DEFAULTS``) are rate 0.08 (86 of the 107
class-0 images, so the model still sees clean zeros; at 0.1 the whole class carries the signal and
clean zeros are lost: test ACC 89.8) and ``test_delta`` 80 (ASR 93 where 40 gives 2).
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
    _ctor_params = ("delta", "f", "test_delta")
    _state_names = ("signal", "test_signal")

    def __init__(
        self, info: DatasetInfo, *, target: int = 0, seed: int = 0, delta: float = 40.0, f: float = 6.0,
        test_delta: float | None = None,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.delta, self.f = float(delta), float(f)
        self.test_delta = self.delta if test_delta is None else float(test_delta)
        if self.delta <= 0 or self.f <= 0 or self.test_delta <= 0:
            raise ValueError(f"sig delta {self.delta}, test_delta {self.test_delta}, f {self.f}: "
                             "expected all > 0")
        self.signal = sig_pattern(info.size, self.delta, self.f)
        self.test_signal = sig_pattern(info.size, self.test_delta, self.f)

    def _add(self, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(x.to(torch.float64) + signal.to(x.device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.signal)

    def apply_test(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.test_signal)
