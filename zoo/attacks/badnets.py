"""BadNets: Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", arXiv 1708.06733 (2017); BackdoorBench's ``attack/badnet.py``.

Trigger: a white (255) square in the bottom-right corner, same value in every channel; pixels
under the square are *replaced*: x' = x * [T = 0] + T * [T > 0]. Dirty-label, all-to-one.

Departure (other resolutions): BackdoorBench resizes its 32x32 trigger image bilinearly, which
blurs the square (a 5x5 block with a soft rim at 64x64). Here the square stays hard-edged and its
side scales with the image: ``max(2, round(3 * size / 32))`` pixels, i.e. 3 at 32 and 28, 2 on
the 16x16 digits, 6 at 64. Pass ``patch=`` to choose the side yourself.
"""

from __future__ import annotations

import torch

from zoo.attacks.base import Attack
from zoo.data import DatasetInfo

__all__ = ["BadNets", "default_patch"]


def default_patch(size: int) -> int:
    """Side of the square for a ``size`` x ``size`` image (3 at 32x32)."""
    return max(2, round(3 * size / 32))


class BadNets(Attack):
    name = "badnets"
    _ctor_params = ("patch", "value")
    _state_names = ("trigger",)

    def __init__(
        self, info: DatasetInfo, *, target: int = 0, seed: int = 0, patch: int | None = None, value: int = 255
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.patch = default_patch(info.size) if patch is None else int(patch)
        if not 1 <= self.patch <= info.size:
            raise ValueError(f"badnets patch {self.patch}: expected 1..{info.size} pixels")
        self.value = int(value)
        if not 1 <= self.value <= 255:
            raise ValueError(f"badnets value {self.value}: expected 1..255 (0 marks 'no trigger')")
        trigger = torch.zeros(info.channels, info.size, info.size, dtype=torch.uint8)
        trigger[:, -self.patch :, -self.patch :] = self.value
        self.trigger = trigger

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        trigger = self.trigger.to(x.device)
        return torch.where(trigger > 0, trigger, x)
