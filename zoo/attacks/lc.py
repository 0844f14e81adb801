"""LC, label-consistent (docstring drafted below, finalized after experiments)."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from zoo.attacks._aux import PreparedAttack, Progress, digest, to_model_input
from zoo.attacks.base import poison_indices, to_uint8
from zoo.data import DatasetInfo, Split
from zoo.loader import augment
from zoo.runtime import autocast

__all__ = ["LC", "corner_pattern", "fast_adversarial_training", "pgd_untargeted", "reinitialized"]

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


def reinitialized(model: nn.Module, seed: int) -> nn.Module:
    """A CPU copy of ``model`` with every layer's parameters (and BN statistics) re-drawn from ``seed``.

    Same architecture as ``model``, freshly initialized as ``build_model`` does (each layer's own
    ``reset_parameters``, in module order), independent of the device and of the global RNG.
    """
    fresh = copy.deepcopy(model).cpu().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return fresh


def fast_adversarial_training(model: nn.Module, train: Split, info: DatasetInfo, *, eps: float, alpha: float,
                              epochs: int, lr: float, batch_size: int, seed: int, device: torch.device,
                              report: Callable[[int, float], None] | None = None) -> nn.Module:
    """"Fast" FGSM adversarial training with a random start (Wong, Rice, Kolter, ICLR 2020), in place.

    Per batch: a random-crop (+ flip where allowed) augmented batch in [0, 1], delta drawn
    uniformly from [-eps, eps], one signed-gradient step of size ``alpha`` on delta, delta
    projected back to [-eps, eps] and the image to [0, 1]; one SGD step (momentum 0.9, weight decay
    5e-4) on the cross-entropy of the adversarial batch. The learning rate follows Wong et al.'s
    triangular cycle, 0 -> ``lr`` at half of the run -> 0, per step. All draws come from one
    generator seeded with ``seed``. Returns ``model`` in eval mode.
    """
    model = model.to(device).train()
    x_all, y_all = train.x.to(device), train.y.to(device)
    n = len(y_all)
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)
    total = epochs * per_epoch
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    shape = (bs, info.channels, info.size, info.size)
    t = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        for i in range(per_epoch):
            t += 1
            for group in opt.param_groups:
                group["lr"] = lr * (1.0 - abs(2.0 * t / (total + 1) - 1.0))
            idx = order[i * bs:(i + 1) * bs]
            x01 = augment(x_all[idx], info, gen).float() / 255.0
            y = y_all[idx]
            delta = (torch.rand(shape, generator=gen, device=device) * 2.0 - 1.0) * eps
            delta.requires_grad_(True)
            with autocast(device):
                loss = F.cross_entropy(model(to_model_input((x01 + delta).clamp(0, 1), info)), y)
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
            with autocast(device):
                loss = F.cross_entropy(model(to_model_input((x01 + delta).clamp(0, 1), info)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().float()
        if report is not None:
            report(epoch + 1, float(loss_sum) / per_epoch)
    return model.eval()


class LC(PreparedAttack):
    name = "lc"
    clean_label = True
    needs_clean_model = True
    _ctor_params = ("eps", "step", "steps", "amplitude", "patch", "robust", "at_eps", "at_epochs", "at_lr",
                    "at_batch_size", "clean_model")
    _state_names = ("adv_x", "adv_idx", "stats")

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
        robust: bool = True,
        at_eps: float | None = None,
        at_epochs: int = 30,
        at_lr: float = 0.2,
        at_batch_size: int = 128,
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
        self.robust = bool(robust)
        self.at_eps = None if at_eps is None else float(at_eps)
        self.at_epochs, self.at_lr, self.at_batch_size = int(at_epochs), float(at_lr), int(at_batch_size)
        if self.at_eps is not None and not 0 <= self.at_eps <= 1:
            raise ValueError(f"lc at_eps {self.at_eps}: expected a number in [0, 1] (or None = eps)")
        if self.at_epochs < 0 or self.at_batch_size < 1 or not self.at_lr > 0:
            raise ValueError(f"lc at_epochs {self.at_epochs}, at_batch_size {self.at_batch_size}, at_lr "
                             f"{self.at_lr}: expected >= 0, >= 1 and > 0")
        self.corners = corner_pattern(info.size, self.patch)
        # Placeholder before prepare: no hardened images (the trigger itself needs none).
        self.adv_x = torch.zeros(0, info.channels, info.size, info.size, dtype=torch.uint8)
        self.adv_idx = torch.zeros(0, dtype=torch.int64)
        self.stats = torch.zeros(3)

    # -- the robust model and hardening -----------------------------------------------------------

    def robust_model(self, splits: Any, clean: nn.Module, device: torch.device, progress: bool = False) -> nn.Module:
        """The adversarially trained model of ``clean``'s architecture, reproducible from the seed."""
        info = self.info
        eps = self.eps if self.at_eps is None else self.at_eps
        model = reinitialized(clean, self.seed)
        bar = Progress(f"lc robust model ({info.name}, eps {eps * 255:.0f}/255)", self.at_epochs, progress,
                       unit="epoch")
        return fast_adversarial_training(model, splits.train, info, eps=eps, alpha=1.25 * eps,
                                         epochs=self.at_epochs, lr=self.at_lr, batch_size=self.at_batch_size,
                                         seed=self.seed, device=device, report=bar.update)

    def prepare(self, splits: Any, clean_model: Callable[[], nn.Module] | None, device: torch.device,
                progress: bool = True, batch_size: int = 256) -> None:
        if clean_model is None:
            raise ValueError("lc needs the clean model: expected a clean_model loader from get_victims")
        model = clean_model()
        if self.robust:
            model = self.robust_model(splits, model, device, progress)
        model = model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        train = splits.train
        idx = torch.nonzero(train.y.cpu() == self.target).flatten()
        chunks = list(torch.split(idx, batch_size))
        bar = Progress(f"lc adversarial class {self.target} ({len(idx)} images, {self.info.name})", len(chunks),
                       progress, unit="batch")
        out, kept = [], 0
        for i, chunk in enumerate(chunks):
            x01 = train.x[chunk.to(train.x.device)].to(device).float() / 255.0
            y = train.y[chunk.to(train.y.device)].to(device)
            adv = pgd_untargeted(model, x01, y, self.info, eps=self.eps, step=self.step, steps=self.steps)
            adv8 = to_uint8(adv * 255.0)
            with torch.no_grad():
                kept += int((model(to_model_input(adv8.float() / 255.0, self.info)).argmax(1) == y).sum())
            out.append(adv8.cpu())
            bar.update(i + 1, float((adv - x01).abs().amax()) * 255)
        self.adv_x = torch.cat(out) if out else torch.zeros(0, *train.x.shape[1:], dtype=torch.uint8)
        self.adv_idx = idx.to(torch.int64)
        with torch.no_grad():
            clean_acc = _accuracy(model, train.x[idx.to(train.x.device)], train.y[idx.to(train.y.device)], self.info,
                                  device)
        self.stats = torch.tensor([clean_acc, 100.0 * kept / max(1, len(idx)), float(self.robust)])
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
        return {"trigger_sha256": digest(self.adv_x, self.adv_idx), "hardened": len(self.adv_idx),
                "aux_acc": float(self.stats[0]), "aux_acc_hardened": float(self.stats[1])}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, device: torch.device) -> float:
    pred = model(to_model_input(x.to(device).float() / 255.0, info)).argmax(1)
    return 100.0 * float((pred == y.to(device)).float().mean()) if len(y) else math.nan
