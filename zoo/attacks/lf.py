"""LF, low-frequency trigger: Zeng, Park, Mangal, Jia, "Rethinking the Backdoor Attacks' Triggers:
A Frequency Perspective", ICCV 2021; BackdoorBench's ``attack/lf.py`` and
``resource/lowFrequency/{generate_pattern,universal_pert,deepfool,gauss_smooth}.py``.

Trigger: an additive, smooth, universal pattern v in [0, xi * 255] (unsigned: it only brightens),
x' = clip(x + v, 0, 255) truncated to uint8. Dirty-label, all-to-one, rate 0.1.

How v is made (on the clean model of the same dataset and arch, i.e. the zoo's ``none`` victim):
``n_images`` = 100 random training images in [0, 1]; for every image that x + v does not yet send
to the target, targeted DeepFool towards t (``overshoot`` 0.02, at most ``max_iter`` = 200
iterations) gives r, and v <- G(v + G(r)), then v is min-max normalized to [0, xi] with xi = 0.2
(the L_inf bound: 51 on the 0..255 scale). G is a separable Gaussian blur with zero padding,
sigma = 6 px and 30 taps at 32 x 32 (scaled with the image size: 3 px / 15 taps on 16 x 16
digits). Passes stop after ``max_passes`` = 50, when the fooling rate exceeds ``fool_rate`` = 0.2,
or when it has plateaued (spread < 0.01 over the last 5 passes). The kept pattern is
floor(v * 255), uint8 0..51, as the shipped ``*_0_255.npy`` files (not generate_pattern.py's
visualisation offset of +127.5).

Departures: the classifier gets *normalized* inputs (upstream feeds [0, 1] images to a model
trained on normalized ones, which the spec calls a quirk); the DeepFool target gradient is taken
through the same normalization. The pattern is built from our own clean model, not a shipped file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from zoo.attacks._aux import (
    PreparedAttack,
    building_progress,
    digest,
    gaussian_kernel,
    to_model_input,
)
from zoo.attacks.base import to_uint8
from zoo.data import DatasetInfo

__all__ = ["LF", "low_pass", "targeted_deepfool"]


def low_pass(v: torch.Tensor, sigma: float, taps: int) -> torch.Tensor:
    """Separable Gaussian blur of C,H,W (or N,C,H,W) with zero padding, same size."""
    x = v if v.ndim == 4 else v[None]
    c = x.shape[1]
    k = gaussian_kernel(sigma, taps).to(x.device, x.dtype)
    left, right = (taps - 1) // 2, taps // 2
    row = k.view(1, 1, 1, taps).expand(c, 1, 1, taps)
    col = k.view(1, 1, taps, 1).expand(c, 1, taps, 1)
    x = F.conv2d(F.pad(x, (left, right, 0, 0)), row, groups=c)
    x = F.conv2d(F.pad(x, (0, 0, left, right)), col, groups=c)
    return x if v.ndim == 4 else x[0]


def targeted_deepfool(model: nn.Module, x01: torch.Tensor, target: int, info: DatasetInfo, *,
                      overshoot: float, max_iter: int) -> torch.Tensor:
    """The perturbation r (C,H,W, [0, 1] scale) that DeepFool finds to send ``x01`` to ``target``."""
    r_tot = torch.zeros_like(x01)
    for _ in range(max_iter):
        x = (x01 + (1 + overshoot) * r_tot).clamp(0, 1).requires_grad_(True)
        logits = model(to_model_input(x[None], info))[0]
        k = int(logits.argmax())
        if k == target:
            break
        gap = logits[k] - logits[target]
        (w,) = torch.autograd.grad(logits[target] - logits[k], x)
        r_tot = r_tot + (gap.detach() + 1e-4) / (w.norm() ** 2 + 1e-12) * w
    return (1 + overshoot) * r_tot


class LF(PreparedAttack):
    name = "lf"
    needs_clean_model = True
    _ctor_params = ("xi", "n_images", "overshoot", "max_iter", "max_passes", "fool_rate", "sigma", "taps",
                    "clean_model")
    _state_names = ("pattern",)

    def __init__(
        self,
        info: DatasetInfo,
        *,
        target: int = 0,
        seed: int = 0,
        xi: float = 0.2,
        n_images: int = 100,
        overshoot: float = 0.02,
        max_iter: int = 200,
        max_passes: int = 50,
        fool_rate: float = 0.2,
        sigma: float | None = None,
        taps: int | None = None,
        clean_model: str | None = None,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.xi, self.n_images, self.overshoot = float(xi), int(n_images), float(overshoot)
        self.max_iter, self.max_passes, self.fool_rate = int(max_iter), int(max_passes), float(fool_rate)
        self.sigma = 6.0 * info.size / 32 if sigma is None else float(sigma)
        self.taps = max(3, round(30 * info.size / 32)) if taps is None else int(taps)
        self.clean_model = clean_model
        if not 0.0 < self.xi <= 1.0:
            raise ValueError(f"lf xi {self.xi}: expected an L_inf bound in (0, 1]")
        if min(self.n_images, self.max_iter, self.max_passes, self.taps) < 1 or self.sigma <= 0:
            raise ValueError(f"lf n_images/max_iter/max_passes/taps/sigma {self.n_images}/{self.max_iter}/"
                             f"{self.max_passes}/{self.taps}/{self.sigma}: expected all > 0")
        self.pattern = self._smooth_noise()

    # -- building the pattern ---------------------------------------------------------------------

    def _smooth_noise(self) -> torch.Tensor:
        """The placeholder before ``prepare``: spec 3.5's substitute (seeded noise, blurred, 0..xi)."""
        gen = torch.Generator().manual_seed(self.seed)
        i = self.info
        v = low_pass(torch.randn(i.channels, i.size, i.size, generator=gen), self.sigma, self.taps)
        return torch.floor(self._normalize(v) * 255.0).clamp(0, 255).to(torch.uint8)

    def _normalize(self, v: torch.Tensor) -> torch.Tensor:
        lo, hi = v.min(), v.max()
        return (v - lo) / (hi - lo) * self.xi if hi > lo else torch.zeros_like(v)

    def _fooling_rate(self, model: nn.Module, x01: torch.Tensor, v: torch.Tensor) -> float:
        with torch.no_grad():
            pred = model(to_model_input((x01 + v).clamp(0, 1), self.info)).argmax(1)
        return float((pred == self.target).float().mean())

    def prepare(self, splits: Any, clean_model: Callable[[], nn.Module] | None, device: torch.device,
                progress: bool = True) -> None:
        if clean_model is None:
            raise ValueError("lf needs the clean model: expected a clean_model loader from get_victims")
        model = clean_model().to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        train = splits.train
        pick = np.random.default_rng([self.seed, 11]).choice(len(train), min(self.n_images, len(train)), replace=False)
        x01 = train.x[torch.from_numpy(pick)].to(device).float() / 255.0
        v = torch.zeros_like(x01[0])
        rates: list[float] = []
        bar = building_progress(f"lf pattern ({self.info.name})", self.max_passes, progress, unit="pass")
        for i in range(self.max_passes):
            for x in x01:
                with torch.no_grad():
                    fooled = int(model(to_model_input((x + v).clamp(0, 1)[None], self.info)).argmax()) == self.target
                if not fooled:
                    r = targeted_deepfool(model, (x + v).clamp(0, 1), self.target, self.info,
                                          overshoot=self.overshoot, max_iter=self.max_iter)
                    v = self._normalize(low_pass(v + low_pass(r, self.sigma, self.taps), self.sigma, self.taps))
            rates.append(self._fooling_rate(model, x01, v))
            bar.update(i + 1, rates[-1])
            if rates[-1] > self.fool_rate or (len(rates) >= 5 and max(rates[-5:]) - min(rates[-5:]) < 0.01):
                break
        self.pattern = torch.floor(v * 255.0).clamp(0, 255).to(torch.uint8).cpu()
        self.fooling_rate = rates[-1]
        self._mark_prepared()

    # -- the trigger ------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return to_uint8(x.float() + self.pattern.to(x.device, torch.float32))

    def describe(self) -> dict[str, Any]:
        return {"trigger_sha256": digest(self.pattern), "max": int(self.pattern.max()),
                "fooling_rate": getattr(self, "fooling_rate", None)}
