"""The interface every zoo model implements: ``forward(x) = head(features(x))``.

Its own module so that :mod:`zoo.models` (the registry) and :mod:`zoo._tv_models` (the
torchvision builds) both depend on it without depending on each other."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """Base: ``forward(x) = head(features(x))``; ``last_block`` is the backbone's last block
    before the head (see :mod:`zoo.models`, per arch), for defenses that tune it with the
    head. Subclasses whose head has another key name expose it as a ``head`` property."""

    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_block(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} names no last block")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
