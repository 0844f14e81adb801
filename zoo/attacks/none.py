"""No attack: the clean reference model.

``training_set`` returns the clean training set unchanged. There is no trigger, so ``apply`` is
the identity and ``triggered(split)`` returns the non-target images *untouched* with their true
labels. Evaluated on that set, "ASR" is the share of clean non-target images the model predicts
as the target class (its natural confusion into class 0, a few percent for a good model) and
"RA" is its accuracy on non-target images: the baseline that a real attack's ASR is read against.
"""

from __future__ import annotations

import torch

from zoo.attacks.base import Attack
from zoo.data import Split

__all__ = ["NoAttack"]


class NoAttack(Attack):
    name = "none"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return x.clone()

    def check(self, train: Split, poison_rate: float) -> None:
        """Nothing is poisoned, so any rate is accepted (the rate is ignored)."""

    def training_set(self, train: Split, *, poison_rate: float, epoch: int, seed: int) -> Split:
        return train
