"""Super-fine-tuning (SFT): whole-model fine-tuning under a two-phase triangular lr.

Sha, He, Berrang, Humbert, Zhang, "Fine-Tuning Is All You Need to Mitigate Backdoor Attacks",
arXiv 2212.09067. No author code is public; the schedule follows the paper's description
(super-convergence-style cyclic lr, a large peak to forget the trigger, then a small peak to
recover utility) as implemented by vtu81/backdoor-toolbox
``other_defenses_tool_box/super_finetuning.py`` [third-party].

All parameters theta, SGD (momentum mu, L2 decay lambda), global iteration t, T iterations in all:

    phase 1: t <  P = round(phase1_fraction * T),  t' = t,      peak = lr_max1
    phase 2: t >= P,                               t' = t - P,  peak = lr_max2
    pos   = t' mod (2 h)
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
from torch import nn

from defenses import _engine as E
from defenses.ft import ft_step
from zoo.data import DatasetInfo, Split

NAME = "sft"

OVERRIDES: dict[str, dict[str, object]] = {
    # backdoor-toolbox's GTSRB learning rates.
    "gtsrb": {"lr_base": 0.003, "lr_max1": 0.25, "lr_max2": 0.005},
    # 100 clean images: batch 32 gives 3 iterations/epoch, 300 in all (15 cycles of 20), ~3 s.
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
    p = round(cfg.phase1_fraction * total)
    peak, t_phase = (cfg.lr_max1, t) if t < p else (cfg.lr_max2, t - p)
    h = cfg.half_cycle
    pos = t_phase % (2 * h)
    rise = pos / h if pos < h else (2 * h - pos) / h
    return cfg.lr_base + (peak - cfg.lr_base) * rise


# The step itself is vanilla FT's (one SGD step on CE); SFT differs only in the schedule above.
sft_step = ft_step


# ============================================ PLUMBING =======================================


def run(
    model: nn.Module,
    clean: Split,
    info: DatasetInfo,
    cfg: Config,
    *,
    seed: int,
    device: torch.device | str,
    precision: str = "auto",
) -> Iterator[E.EpochResult]:
    """Super-fine-tune all of ``model`` in place; yield after each epoch."""
    dev, _, opt = E.sgd_on_all(model, device, precision, lr=cfg.lr_base, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    yield from E.fit(
        model, clean, info, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, device=dev,
        optimizer=opt,
        lr_at=lambda t, ipe: sft_lr(t, cfg.epochs * ipe, cfg),
        step=lambda x, y: sft_step(model, opt, x, y, precision),
    )
