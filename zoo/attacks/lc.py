"""LC, label-consistent: Turner, Tsipras, Madry, "Label-Consistent Backdoor Attacks",
arXiv 1912.02771 (2019); BackdoorBench's ``attack/lc.py``, ``bd_img_transform/lc.py`` and
``resource/label-consistent/craft_adv_dataset.py``.

Step 1, hardening: every target-class training image is replaced by an untargeted L_inf PGD
adversarial example (away from its true label) against a classifier: ``eps`` = 8/255,
``step`` = 1.5/255, ``steps`` = 100, no random start, on [0, 1] images; truncated to uint8.
Step 2, trigger ("all-corners", reduced_amplitude ``amplitude`` = 1): four 3 x 3 patterns, one in
each corner of a 32 x 32 image, each pixel +-255 * amplitude *added* and clipped (so W = 255,
B = 0 at amplitude 1). Rows from the top: top-left and bottom-left WBB / BWB / WBW; top-right and
bottom-right BBW / BWB / WBW. For other sizes the 32 x 32 annotation is resized nearest-neighbour
(``patch`` = None, BackdoorBench). Caveat: at 16 x 16 that keeps only 4 white pixels (the
resize drops the last row/column of the bottom/right patterns), invisible on the digits' black
background; ``patch=3`` instead puts the full 3 x 3 patterns in every corner at any size. Clean-label: only target-class images are poisoned (hardened, then
triggered), labels kept; the rate counts against the whole training set. Test: trigger only.

Departures: PGD runs against the zoo's *normally trained* clean model of the same dataset and
arch (BackdoorBox's substitute, spec 3.4 plan b), not an adversarially trained ResNet-18, and
through the dataset normalization; adversarial examples from a non-robust model are weaker
"hard" features. Only the target class is hardened (the rest is never used). The hardened
images (``adv_x``) and their training-set indices (``adv_idx``) are the attack's state, so the
poisoned training set is reproducible from the store.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from zoo.attacks._aux import PreparedAttack, Progress, digest, to_model_input
from zoo.attacks.base import poison_indices, to_uint8
from zoo.data import DatasetInfo, Split

__all__ = ["LC", "corner_pattern", "pgd_untargeted"]

_LEFT = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))  # WBB / BWB / WBW (+1 = white, -1 = black)
_RIGHT = ((-1, -1, 1), (-1, 1, -1), (1, -1, 1))  # BBW / BWB / WBW


def corner_pattern(size: int, patch: int | None = None) -> torch.Tensor:
    """The all-corners annotation (+1/-1/0), float32 size x size.

    ``patch=None``: the 32 x 32 annotation resized nearest-neighbour (BackdoorBench); an int: the
    3 x 3 patterns resized nearest to ``patch`` x ``patch`` and put in each corner of the image.
    """
    left, right = torch.tensor(_LEFT, dtype=torch.float32), torch.tensor(_RIGHT, dtype=torch.float32)
    side = 32 if patch is None else size
    p = 3 if patch is None else patch
    if p != 3:
        left = F.interpolate(left[None, None], size=(p, p), mode="nearest")[0, 0]
        right = F.interpolate(right[None, None], size=(p, p), mode="nearest")[0, 0]
    a = torch.zeros(side, side)
    a[:p, :p], a[-p:, :p] = left, left
    a[:p, -p:], a[-p:, -p:] = right, right
    if side == size:
        return a
    return F.interpolate(a[None, None], size=(size, size), mode="nearest")[0, 0]


def pgd_untargeted(model: nn.Module, x01: torch.Tensor, y: torch.Tensor, info: DatasetInfo, *,
                   eps: float, step: float, steps: int) -> torch.Tensor:
    """L_inf PGD ascending the cross-entropy of the true label, no random start; [0, 1] floats."""
    adv = x01.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(to_model_input(adv, info)), y)
        (g,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + step * g.sign()
        adv = torch.min(torch.max(adv, x01 - eps), x01 + eps).clamp(0, 1)
    return adv.detach()


class LC(PreparedAttack):
    name = "lc"
    clean_label = True
    needs_clean_model = True
    _ctor_params = ("eps", "step", "steps", "amplitude", "patch", "clean_model")
    _state_names = ("adv_x", "adv_idx")

    def __init__(
        self,
        info: DatasetInfo,
        *,
        target: int = 0,
        seed: int = 0,
        eps: float = 8 / 255,
        step: float = 1.5 / 255,
        steps: int = 100,
        amplitude: float = 1.0,
        patch: int | None = None,
        clean_model: str | None = None,
    ) -> None:
        super().__init__(info, target=target, seed=seed)
        self.eps, self.step, self.steps, self.amplitude = float(eps), float(step), int(steps), float(amplitude)
        self.clean_model = clean_model
        if not (0 <= self.eps <= 1 and self.step > 0 and self.steps >= 0):
            raise ValueError(f"lc eps {self.eps}, step {self.step}, steps {self.steps}: expected eps in [0, 1], "
                             "step > 0, steps >= 0")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"lc amplitude {self.amplitude}: expected a number in (0, 1]")
        self.patch = None if patch is None else int(patch)
        if self.patch is not None and not 1 <= self.patch <= info.size // 2:
            raise ValueError(f"lc patch {self.patch}: expected 1..{info.size // 2} pixels per corner")
        self.corners = corner_pattern(info.size, self.patch)
        # Placeholder before prepare: no hardened images (the trigger itself needs none).
        self.adv_x = torch.zeros(0, info.channels, info.size, info.size, dtype=torch.uint8)
        self.adv_idx = torch.zeros(0, dtype=torch.int64)

    # -- hardening --------------------------------------------------------------------------------

    def prepare(self, splits: Any, clean_model: Callable[[], nn.Module] | None, device: torch.device,
                progress: bool = True, batch_size: int = 256) -> None:
        if clean_model is None:
            raise ValueError("lc needs the clean model: expected a clean_model loader from get_victims")
        model = clean_model().to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        train = splits.train
        idx = torch.nonzero(train.y.cpu() == self.target).flatten()
        chunks = list(torch.split(idx, batch_size))
        bar = Progress(f"lc adversarial class {self.target} ({len(idx)} images, {self.info.name})", len(chunks),
                       progress, unit="batch")
        out = []
        for i, chunk in enumerate(chunks):
            x01 = train.x[chunk.to(train.x.device)].to(device).float() / 255.0
            y = train.y[chunk.to(train.y.device)].to(device)
            adv = pgd_untargeted(model, x01, y, self.info, eps=self.eps, step=self.step, steps=self.steps)
            out.append(to_uint8(adv * 255.0).cpu())
            bar.update(i + 1, float((adv - x01).abs().amax()) * 255)
        self.adv_x = torch.cat(out) if out else torch.zeros(0, *train.x.shape[1:], dtype=torch.uint8)
        self.adv_idx = idx.to(torch.int64)
        self._mark_prepared()

    # -- the trigger ------------------------------------------------------------------------------

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        add = (self.corners * 255.0 * self.amplitude).to(x.device)
        return to_uint8(x.float() + add)

    def training_set(self, train: Split, *, poison_rate: float, epoch: int, seed: int) -> Split:
        """Target-class images replaced by their hardened version, then triggered; labels kept."""
        self._require()
        idx = poison_indices(train.y, poison_rate, target=self.target, clean_label=True, seed=seed)
        pos = torch.searchsorted(self.adv_idx, idx)
        if bool((pos >= len(self.adv_idx)).any()) or not torch.equal(self.adv_idx[pos.clamp(max=len(self.adv_idx) - 1)], idx):
            raise ValueError(f"lc poisoned indices are not all hardened ({len(self.adv_idx)} stored): "
                             "expected the training split the attack was prepared on")
        x, y = train.x.clone(), train.y.clone()
        dev_idx = idx.to(x.device)
        x[dev_idx] = self.apply(self.adv_x[pos].to(x.device))
        return Split(x, y)

    def describe(self) -> dict[str, Any]:
        return {"trigger_sha256": digest(self.adv_x, self.adv_idx), "hardened": len(self.adv_idx)}
