"""Vanilla fine-tuning (FT), as run by BackdoorBench.

Wu et al., "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning", NeurIPS 2022
Datasets and Benchmarks; code SCLBD/BackdoorBench ``defense/ft.py``, ``config/defense/ft/*.yaml``.

Update rule (all parameters theta; SGD, momentum mu, L2 decay lambda added to the gradient):

    g_t     = grad_theta CE(f(x; theta_t), y) + lambda * theta_t
    v_{t+1} = mu * v_t + g_t
    theta_{t+1} = theta_t - eta_e * v_{t+1}
    eta_e   = eta / 2 * (1 + cos(pi * e / E))        (cosine, stepped once per epoch e)

| symbol   | variable         | Config field   |
|----------|------------------|----------------|
| eta      | ``cfg.lr``       | lr             |
| mu       | optimizer        | momentum       |
| lambda   | optimizer        | weight_decay   |
| E        | ``cfg.epochs``   | epochs         |
| B        | batch size       | batch_size     |
| -        | last partial batch | drop_last    |

Batches and schedule as BackdoorBench's loop: ``defense/ft.py`` builds its clean loader with
``DataLoader(..., shuffle=True)`` (l. 230 on ``main``, l. 197 on ``v2``): no ``drop_last``, so
the last partial batch is kept and an epoch is ``ceil(n / B)`` steps; the trainer
(``utils/trainer_cls.py``, ``PureCleanModelTrainer.train_one_epoch_on_mix``) steps the cosine
scheduler once per epoch, as ``eta_e`` above. Departure: BackdoorBench hard-codes
``T_max = 100`` epochs (``utils/aggregate_block/train_settings_generate.py``); here
``T_max = epochs`` (equal at the paper's 100 epochs), so a shorter budget still ends at lr 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from defenses import _engine as E
from zoo.classifier import Classifier
from zoo.data import DatasetInfo, Split
from zoo.runtime import Precision, autocast

NAME = "ft"

# Per-dataset diffs over the paper defaults; one line of why each.
OVERRIDES: dict[str, dict[str, object]] = {
    # 100 clean images: batch 256 would be 1 step/epoch; 32 gives 4 steps/epoch (3 full, one
    # of 4), 400 steps in all (BackdoorBench: ~1,000 on CIFAR-10).
    "digits": {"batch_size": 32},
}


@dataclass(frozen=True)
class Config:
    """BackdoorBench FT defaults (CIFAR-10, identical for GTSRB and CIFAR-100)."""

    lr: float = 0.01  #: initial SGD learning rate (per batch of ``batch_size``)
    epochs: int = 100  #: passes over the clean split; also the cosine period (epochs)
    batch_size: int = 256  #: images per optimizer step
    momentum: float = 0.9  #: SGD momentum (dimensionless)
    weight_decay: float = 5e-4  #: L2 coefficient added to the gradient (per unit weight)
    drop_last: bool = False  #: drop each pass's last partial batch (BackdoorBench keeps it)

    def __post_init__(self) -> None:
        E.check_common(self)


# ============================================ ALGO LOGIC =====================================


def ft_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: Precision
) -> torch.Tensor:
    """One SGD step on CE; weight decay and momentum are the optimizer's."""
    with autocast(x.device, precision):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


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
    """Fine-tune all of ``model`` in place on ``clean``; yield after each epoch."""
    dev, _, opt = E.sgd_on_all(model, device, precision, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    yield from E.fit(
        model, clean, info, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, device=dev,
        optimizer=opt,
        lr_at=lambda t, ipe: E.cosine_lr(cfg.lr, t // ipe, cfg.epochs),
        step=lambda x, y: ft_step(model, opt, x, y, precision), drop_last=cfg.drop_last,
    )
