"""Super-fine-tuning (SFT): whole-model fine-tuning under a two-phase triangular lr.

Sha, He, Berrang, Humbert, Zhang, "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
arXiv 2212.09067. No author code is public; the schedule follows the paper's description
(super-convergence-style cyclic lr, a large peak to forget the trigger, then a small peak to
recover utility) as implemented by vtu81/backdoor-toolbox
``other_defenses_tool_box/super_finetuning.py`` [third-party].

All parameters theta, SGD (momentum mu, L2 decay lambda), global iteration t, T iterations in all:

    phase 1: t <  P = round(phase1_fraction * T),  peak = lr_max1
    phase 2: t >= P,                               peak = lr_max2
    pos   = t mod (2 h)                                      (one counter over both phases)
    lr(t) = lr_base + (peak - lr_base) * pos / h             if pos < h   (ramp up)
          = lr_base + (peak - lr_base) * (2h - pos) / h      otherwise    (ramp down)
    theta <- SGD(theta, grad CE, lr(t), mu, lambda)

| symbol    | variable   | Config field     |
|-----------|------------|------------------|
| lr_base   | base       | lr_base          |
| lr_max1/2 | peak       | lr_max1, lr_max2 |
| h         | half       | half_cycle (iterations) |
| P / T     | phase1     | phase1_fraction, epochs |
| mu        | optimizer  | momentum         |
| lambda    | optimizer  | weight_decay     |
| -         | last partial batch | drop_last |

Batches and schedule as backdoor-toolbox's loop (``super_finetuning.py``): its clean loader is
``DataLoader(..., batch_size=128, shuffle=True)`` (l. 96), no ``drop_last``, so the last partial
batch is kept (``ceil(n / B)`` iterations an epoch). Its ``adjust_lr`` (l. 44-60) is set per
iteration from one global ``iteration`` counter (l. 106, 120) that phase 2 does not restart,
as ``pos`` above; the phase changes at an epoch, ``epoch < 40`` of 100 (l. 118), which is P
here whenever ``phase1_fraction * epochs`` is a whole number (0.4 x 100). Departure: the
toolbox calls ``adjust_lr`` *after* each step (l. 116-118), so its step t runs at lr(t - 1)
(and its first at lr_base); here step t runs at lr(t), one iteration earlier in a 2h cycle.

Defaults: backdoor-toolbox's CIFAR-10 values (lr 0.03 / 2.5 / 0.05, half-cycle 10 iterations,
phase 1 = the first 40 of 100 epochs, batch 128, plain SGD without momentum or weight decay).
Chosen over the Landseer guide (3e-4 / 0.1 / 1e-3, momentum 0.9, 6 epochs) because it is running
code rather than prose, and its half-cycle is counted in iterations, which stays meaningful on
small clean splits. The peak lr 2.5 is paired with momentum 0; with momentum 0.9 expect
divergence at lr_max1 >= 1 (reported as ``diverged``, not raised).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from defenses import _engine as E
from defenses.ft import ft_step
from zoo.classifier import Classifier
from zoo.data import DatasetInfo, Split
from zoo.runtime import Precision

NAME = "sft"

OVERRIDES: dict[str, dict[str, object]] = {
    # backdoor-toolbox's GTSRB learning rates.
    "gtsrb": {"lr_base": 0.003, "lr_max1": 0.25, "lr_max2": 0.005},
    # 100 clean images: batch 32 gives 4 iterations/epoch (3 full, one of 4), 400 in all
    # (20 cycles of 20), a few s.
    "digits": {"batch_size": 32},
}


@dataclass(frozen=True)
class Config:
    """backdoor-toolbox's super-fine-tuning defaults (CIFAR-10)."""

    lr_base: float = 0.03  #: lr at the ends of each cycle
    lr_max1: float = 2.5  #: peak lr of phase 1 (forgetting)
    lr_max2: float = 0.05  #: peak lr of phase 2 (recovering), lr_base < lr_max2 < lr_max1
    half_cycle: int = 10  #: h, iterations from lr_base up to the peak (and as many back down)
    phase1_fraction: float = 0.4  #: share of all iterations spent in phase 1 (fraction)
    epochs: int = 100  #: passes over the clean split
    batch_size: int = 128  #: images per iteration
    momentum: float = 0.0  #: SGD momentum (dimensionless)
    weight_decay: float = 0.0  #: L2 coefficient added to the gradient
    drop_last: bool = False  #: drop each pass's last partial batch (the toolbox keeps it)

    def __post_init__(self) -> None:
        E.check_common(self)
        E.check(0.0 < self.lr_base < self.lr_max2 < self.lr_max1,
                f"lr_base={self.lr_base}, lr_max2={self.lr_max2}, lr_max1={self.lr_max1}: "
                "expected 0 < lr_base < lr_max2 < lr_max1")
        E.check(self.half_cycle >= 1, f"half_cycle={self.half_cycle}: expected an integer >= 1")
        E.check(0.0 <= self.phase1_fraction <= 1.0,
                f"phase1_fraction={self.phase1_fraction}: expected a number in [0, 1]")


# ============================================ ALGO LOGIC =====================================


def sft_lr(t: int, total: int, cfg: Config) -> float:
    """The two-phase triangular lr at global iteration ``t`` of ``total``."""
    peak = cfg.lr_max1 if t < round(cfg.phase1_fraction * total) else cfg.lr_max2
    h = cfg.half_cycle
    pos = t % (2 * h)
    rise = pos / h if pos < h else (2 * h - pos) / h
    return cfg.lr_base + (peak - cfg.lr_base) * rise


# The step itself is vanilla FT's (one SGD step on CE); SFT differs only in the schedule above.
sft_step = ft_step


# ============================================ PLUMBING =======================================


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
    """Super-fine-tune all of ``model`` in place; yield after each epoch."""
    dev, _, opt = E.sgd_on_all(model, device, precision, lr=cfg.lr_base, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    yield from E.fit(
        model, clean, info, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, device=dev,
        optimizer=opt,
        lr_at=lambda t, ipe: sft_lr(t, cfg.epochs * ipe, cfg),
        step=lambda x, y: sft_step(model, opt, x, y, precision), drop_last=cfg.drop_last,
    )
