"""FT-SAM: fine-tuning with (adaptive) sharpness-aware minimization.

Zhu, Wei, Shen, Fan, Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023 (arXiv 2304.11823); code SCLBD/BackdoorBench ``defense/ft-sam.py``,
``utils/defense_utils/sam/sam.py``, ``config/defense/ft-sam/*.yaml``.

Per step, over all parameters w that have a gradient (ASAM by default, Kwon et al. 2021):

    g    = grad_w L_s(w)                                       first pass, BN stats updated
    T_w  = |w|          (adaptive)      or   1   (plain SAM)
    e    = rho * T_w^2 g / (|| T_w g ||_2 + 1e-12)             perturbation
    g'   = grad_w L_s(w + e)                                   second pass, BN momentum 0
    w   <- SGD(w, g', lr, momentum, weight_decay)               step from w (perturbation undone)

L_s is label-smoothed CE in BackdoorBench's form: target 1 - s on the true class and s / (C - 1)
on each other class. (``F.cross_entropy(label_smoothing=s)`` would put s / C on every class,
the true one included; that is not what BackdoorBench trains with.)

| symbol | variable              | Config field            |
|--------|-----------------------|-------------------------|
| rho    | ``cfg.rho``           | rho                     |
| T_w    | ``p.abs()`` or 1      | adaptive                |
| s      | ``cfg.label_smoothing``| label_smoothing        |
| e      | ``perturbation()``    | -                       |
| lr     | ``cfg.lr``            | lr, scheduler_granularity |
| -      | last partial batch    | drop_last               |

Batches as BackdoorBench's loop: ``defense/ft-sam.py`` builds its clean loader with
``DataLoader(..., shuffle=True)`` (l. 439 on ``main``): no ``drop_last``, so the last partial
batch is kept and an epoch is ``ceil(n / batch_size)`` steps.

Schedule quirk: BackdoorBench steps ``CosineAnnealingLR(T_max=100)`` once per *mini-batch*
(``_train_sam``, l. 302), so on CIFAR-10 (10 batches/epoch, 1,000 steps) the lr runs 5 full
cosine cycles (period 200 steps) and ends at its peak. ``scheduler_granularity=
"per_iter_bb_quirk"`` reproduces that; the default ``"per_epoch"`` is the intended half cosine
over ``epochs`` (stepped per epoch), a documented departure from the code.
The GSAM decomposition term of BackdoorBench's SAM class is off there (alpha = 0), so it is omitted.
rho is constant (BackdoorBench's rho scheduler has rho_max = rho_min).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from defenses import _engine as E
from zoo.classifier import Classifier
from zoo.data import DatasetInfo, Split
from zoo.runtime import Precision, autocast

NAME = "ftsam"

OVERRIDES: dict[str, dict[str, object]] = {
    # BackdoorBench config/defense/ft-sam/gtsrb.yaml.
    "gtsrb": {"rho": 8.0, "label_smoothing": 0.0, "epochs": 50},
    # 100 clean images: batch 32 gives 4 steps/epoch (3 full, one of 4); 50 epochs (two passes
    # per step, 200 steps).
    "digits": {"batch_size": 32, "epochs": 50},
}

BB_QUIRK_T_MAX = 100  # BackdoorBench's cosine T_max, counted in mini-batches under the quirk


@dataclass(frozen=True)
class Config:
    """BackdoorBench FT-SAM defaults for CIFAR-10."""

    lr: float = 0.01  #: initial SGD learning rate of the base optimizer
    epochs: int = 100  #: passes over the clean split
    batch_size: int = 256  #: images per step (each step costs two forward/backward passes)
    momentum: float = 0.9  #: SGD momentum (dimensionless)
    weight_decay: float = 5e-4  #: L2 coefficient added to the gradient by the base SGD
    rho: float = 2.0  #: perturbation radius (ASAM scale, weight-norm units; ~10x plain SAM's)
    adaptive: bool = True  #: ASAM (T_w = |w|) if True, plain SAM (T_w = 1) if False
    label_smoothing: float = 0.1  #: s: 1-s on the true class, s/(C-1) on others (probability)
    scheduler_granularity: Literal["per_epoch", "per_iter_bb_quirk"] = "per_epoch"  #: see header
    drop_last: bool = False  #: drop each pass's last partial batch (BackdoorBench keeps it)

    def __post_init__(self) -> None:
        E.check_common(self)
        E.check(self.rho >= 0.0, f"rho={self.rho}: expected a number >= 0")
        E.check(0.0 <= self.label_smoothing < 1.0,
                f"label_smoothing={self.label_smoothing}: expected a number in [0, 1)")


# ============================================ ALGO LOGIC =====================================


def smoothed_ce(logits: torch.Tensor, y: torch.Tensor, s: float) -> torch.Tensor:
    """CE against 1 - s on the true class and s / (C - 1) on each other class (BackdoorBench)."""
    logp = F.log_softmax(logits.float(), dim=1)
    c = logits.shape[1]
    target = torch.full_like(logp, s / (c - 1))
    target.scatter_(1, y[:, None], 1.0 - s)
    return -(target * logp).sum(1).mean()


@torch.no_grad()
def perturbation(params: Sequence[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """e = rho * T_w^2 g / (||T_w g||_2 + 1e-12), T_w = |w| (adaptive) or 1; norm over all."""
    scaled = [(p.abs() * E.grad_of(p) if adaptive else E.grad_of(p)) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in scaled]))
    t_w = [p.abs() if adaptive else 1.0 for p in params]
    return [rho * tw * t / (norm + 1e-12) for tw, t in zip(t_w, scaled)]


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm momentum 0 (running stats untouched) for the second SAM pass."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def sam_step(model: nn.Module, opt: torch.optim.Optimizer, params: Sequence[torch.Tensor],
             x: torch.Tensor, y: torch.Tensor, cfg: Config, precision: Precision) -> torch.Tensor:
    """One (A)SAM step: ascend to w + e, take the gradient there, step from w."""
    # 1. first pass at w: g, BN running stats updated normally
    with autocast(x.device, precision):
        loss = smoothed_ce(model(x), y, cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # 2. perturb: w <- w + e
    live = [p for p in params if p.grad is not None]
    e = perturbation(live, cfg.rho, cfg.adaptive)
    with torch.no_grad():
        for p, e_p in zip(live, e):
            p.add_(e_p)
    # 3. second pass at w + e with BN momentum 0: g'
    opt.zero_grad(set_to_none=True)
    with bn_stats_frozen(model), autocast(x.device, precision):
        loss_adv = smoothed_ce(model(x), y, cfg.label_smoothing)
    loss_adv.backward()
    # 4. restore w <- w - e, then the base SGD step with g'
    with torch.no_grad():
        for p, e_p in zip(live, e):
            p.sub_(e_p)
    opt.step()
    return loss.detach()


# ============================================ PLUMBING =======================================


def lr_schedule(cfg: Config) -> E.LrAt:
    """Half cosine per epoch, or BackdoorBench's per-mini-batch cosine with T_max = 100."""
    if cfg.scheduler_granularity == "per_iter_bb_quirk":
        return lambda t, ipe: E.cosine_lr(cfg.lr, t, BB_QUIRK_T_MAX)
    return lambda t, ipe: E.cosine_lr(cfg.lr, t // ipe, cfg.epochs)


def run(
    model: Classifier,
    clean: Split,
    info: DatasetInfo,
    cfg: Config,
    *,
    seed: int,
    device: torch.device | str,
    precision: Precision = "auto",
) -> Iterator[E.EpochResult]:
    """FT-SAM on all of ``model`` in place; yield after each epoch."""
    dev, params, opt = E.sgd_on_all(model, device, precision, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    yield from E.fit(
        model, clean, info, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, device=dev,
        optimizer=opt, lr_at=lr_schedule(cfg),
        step=lambda x, y: sam_step(model, opt, params, x, y, cfg, precision),
        drop_last=cfg.drop_last,
    )
