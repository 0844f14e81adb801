"""TrojanNN: Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018; BackdoorBench's ``attack/trojannn.py`` (config ``trojannn/preactresnet18.yaml``).

Trigger generation on the clean model of the same dataset and arch (the zoo's ``none`` victim):
1. pick ``num_neuron`` = 2 head inputs (units of ``features(x)``) whose sum over classes of
   |W| in the head is largest ("most connected");
2. start from the mask image (1 inside the trigger region, 0 outside), keep the region;
3. ``steps`` = 1000 iterations of sign-gradient descent with step ``lr`` = 0.1 on
   sum_i (feature_i(T * keep) - ``target_value``)^2, ``target_value`` = 100, projecting T to
   +-``bound`` = 0.3 around the start and to [0, 1]; stop early when the cost is below 1e-3;
4. the trigger image is floor(T * 255) inside the region, 0 outside.
Poisoning: x' = clip(x + T, 0, 255) (additive, so the region saturates), truncated to uint8.
Dirty-label, all-to-one, rate 0.1; the victim is trained from scratch, as BackdoorBench does
(the original paper retrains the pretrained model).

Departures: the mask is a square (side 3/8 of the image, lower-right quadrant: rows/cols 17..28
at 32 x 32, 8..13 on 16 x 16 digits) instead of the ``apple4.png`` silhouette, which covers
rows 16-29 / cols 17-28 at 32 x 32; the spec allows a square substitute. BackdoorBench casts
x + T to uint8 *before* clipping, so bright pixels wrap around; here the sum is clipped to 255
first (spec 3.9 recommends this fix). The optimized image goes through the dataset
normalization, as every input of our classifiers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zoo.attacks._aux import PreparedAttack, building_progress, digest, to_model_input
from zoo.attacks.base import to_uint8
from zoo.classifier import Classifier
from zoo.data import DatasetInfo

__all__ = ["TrojanNN", "square_mask", "top_neurons"]


def square_mask(size: int) -> torch.Tensor:
    """float32 H x W, 1 on a square of side round(3/8 size) starting at round(17/32 size)."""
    side, start = max(1, round(size * 3 / 8)), round(size * 17 / 32)
    start = min(start, size - side)
    m = torch.zeros(size, size)
    m[start : start + side, start : start + side] = 1.0
    return m


def top_neurons(head: nn.Linear, k: int) -> torch.Tensor:
    """Indices of the ``k`` head inputs with the largest sum over classes of |W|."""
    return head.weight.detach().abs().sum(0).topk(k).indices


class TrojanNN(PreparedAttack):
    name = "trojannn"
    needs_clean_model = True
    _ctor_params = ("num_neuron", "steps", "lr", "bound", "target_value", "clean_model")
    _state_names = ("trigger",)

    def __init__(
        self,
        info: DatasetInfo,
        *,
        target: int = 0,
        seed: int = 0,
        num_neuron: int = 2,
        steps: int = 1000,
        lr: float = 0.1,
        bound: float = 0.3,
        target_value: float = 100.0,
        clean_model: str | None = None,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.num_neuron, self.steps, self.lr = int(num_neuron), int(steps), float(lr)
        self.bound, self.target_value = float(bound), float(target_value)
        self.clean_model = clean_model
        if self.num_neuron < 1 or self.steps < 0 or self.lr <= 0 or not 0 <= self.bound <= 1:
            raise ValueError(f"trojannn num_neuron {self.num_neuron}, steps {self.steps}, lr {self.lr}, "
                             f"bound {self.bound}: expected >= 1, >= 0, > 0, in [0, 1]")
        self.mask = square_mask(info.size)
        # Placeholder before prepare: the optimization's starting point, the mask at full value.
        self.trigger = (self.mask * 255).to(torch.uint8).expand(info.channels, -1, -1).contiguous()

    def prepare(self, splits: Any, clean_model: Callable[[], Classifier] | None, device: torch.device,
                progress: bool = True) -> None:
        if clean_model is None:
            raise ValueError("trojannn needs the clean model: expected a clean_model loader from get_victims")
        model = clean_model().to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        neurons = top_neurons(model.head, self.num_neuron).to(device)
        keep = self.mask.to(device).expand(self.info.channels, -1, -1)[None]
        start = keep.clone()
        t = start.clone()
        bar = building_progress(f"trojannn trigger ({self.info.name})", self.steps, progress)
        cost = float("nan")
        for i in range(self.steps):
            t.requires_grad_(True)
            feats = model.features(to_model_input(t * keep, self.info))[0, neurons]
            loss = ((feats - self.target_value) ** 2).sum()
            (g,) = torch.autograd.grad(loss, t)
            t = (t.detach() - self.lr * g.sign())
            t = torch.min(torch.max(t, start - self.bound), start + self.bound).clamp(0, 1)
            cost = float(loss.detach())
            if (i + 1) % 50 == 0 or i + 1 == self.steps:
                bar.update(i + 1, cost)
            if cost < 1e-3:
                break
        self.trigger = (torch.floor(t * keep * 255.0)).clamp(0, 255).to(torch.uint8)[0].cpu()
        self.cost = cost
        self._mark_prepared()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(x.float() + self.trigger.to(x.device, torch.float32))

    def describe(self) -> dict[str, Any]:
        return {"trigger_sha256": digest(self.trigger), "cost": getattr(self, "cost", None)}
