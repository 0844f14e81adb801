"""Shared mechanics of every fine-tuning defense; the algorithms live in their own files.

What is here exists once:

- configs: re-exported from :mod:`defenses._config` (one type system for every ``Config``);
- parameters: :func:`select_trainable` (all / head / backbone / last block and head, via
  ``requires_grad``; frozen parts in eval mode), :func:`reinit_head` (PyTorch's default
  ``nn.Linear`` init, seeded), :func:`grad_of` (a parameter's gradient after ``backward``);
- schedules: the lr "at global step t" helpers :func:`cosine_lr` and :func:`multistep_lr`
  (super-fine-tuning's triangular schedule is its algorithm and lives in ``sft.py``);
- the loop: :func:`fit` draws device batches (one shuffled pass of :class:`zoo.loader.DeviceLoader`,
  keeping or dropping the last partial batch as the defense's reference loop does, or a fixed
  number of batches drawn with replacement), sets the lr of every step, calls the defense's
  ``step(x, y) -> loss`` and yields one :class:`EpochResult` per epoch.

Divergence: the per-step losses are summed on the device and checked, together with the trainable
parameters, once per epoch (one host sync per epoch, none per step). A NaN or inf anywhere in the
epoch propagates into that sum, so the epoch is reported ``diverged=True`` and the loop stops. It
never raises for divergence.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from zoo.classifier import Classifier
from zoo.config import ConfigError, check, check_common
from zoo.data import DatasetInfo, Split
from zoo.loader import DeviceLoader, augment, normalize
from zoo.runtime import PRECISIONS, prepare_model, to_device_layout

__all__ = [
    "ConfigError",
    "EpochResult",
    "Trainable",
    "check",
    "check_common",
    "cosine_lr",
    "fit",
    "grad_of",
    "multistep_lr",
    "prepare",
    "reinit_head",
    "select_trainable",
]

Trainable = Literal["all", "head", "backbone", "last_block"]
TRAINABLE: tuple[str, ...] = typing.get_args(Trainable)


@dataclass(frozen=True)
class EpochResult:
    """What a defense reports after each epoch."""

    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch's steps (non-finite when diverged)
    lr: float  # learning rate of the epoch's last step
    diverged: bool  # a non-finite loss or parameter appeared; the run stops after this result


# =============================================================================================
# Parameters
# =============================================================================================


def select_trainable(model: Classifier, which: Trainable) -> list[nn.Parameter]:
    """Set ``requires_grad`` so only ``which`` is tuned, and put the tuned parts in train mode.

    ``"last_block"`` tunes ``model.last_block`` and the head. Frozen backbone parts
    (``"head"``, ``"last_block"``) are put in eval mode, so their BatchNorm running statistics
    stay fixed and their function is unchanged: only the named parts move.
    """
    if which not in TRAINABLE:
        raise ConfigError(f"trainable={which!r}: expected one of {', '.join(TRAINABLE)}")
    by_which: dict[str, list[nn.Module]] = {"all": [model], "backbone": [model], "head": [model.head],
                                            "last_block": [model.last_block, model.head]}
    parts = by_which[which]
    frozen = {id(p) for p in model.head.parameters()} if which == "backbone" else set()
    tuned = {id(p) for m in parts for p in m.parameters()} - frozen
    for p in model.parameters():
        p.requires_grad_(id(p) in tuned)
    model.train(which in ("all", "backbone"))  # a frozen part of the backbone: eval mode
    for m in parts:
        m.train()
    return [p for p in model.parameters() if p.requires_grad]


def reinit_head(head: nn.Linear, seed: int) -> None:
    """PyTorch's default Linear init range: weight and bias ~ U(-1/sqrt(d), 1/sqrt(d)), seeded."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        w = torch.empty(head.weight.shape).uniform_(-bound, bound, generator=gen)
        head.weight.copy_(w)
        if head.bias is not None:
            b = torch.empty(head.bias.shape).uniform_(-bound, bound, generator=gen)
            head.bias.copy_(b)


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` where a step has just filled it with ``backward`` (never None there)."""
    if p.grad is None:
        raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no gradient: "
                           "expected backward() to have reached it")
    return p.grad


# =============================================================================================
# Schedules: lr at a step, from the step's position (no scheduler objects, no state)
# =============================================================================================


def cosine_lr(base: float, t: float, t_max: float) -> float:
    """``CosineAnnealingLR`` (eta_min 0) in closed form; periodic beyond ``t_max`` as torch's."""
    return base * (1.0 + math.cos(math.pi * t / t_max)) / 2.0


def multistep_lr(base: float, t: float, milestones: Sequence[float], gamma: float) -> float:
    """``MultiStepLR``: ``base * gamma ** (number of milestones <= t)``."""
    return base * gamma ** sum(1 for m in milestones if t >= m)


# =============================================================================================
# The loop
# =============================================================================================

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LrAt = Callable[[int, int], float]  # (global step, steps per epoch) -> lr


def _with_replacement(
    split: Split, info: DatasetInfo, batch_size: int, steps: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` augmented batches whose indices are drawn with replacement (NGF's sampler)."""
    n = len(split)
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen, device=split.x.device)
        x = normalize(augment(split.x[idx], info, gen), info)
        x = to_device_layout(x)
        yield x, split.y[idx]


def _all_finite(params: Sequence[torch.Tensor], total: torch.Tensor) -> torch.Tensor:
    flags = [torch.isfinite(total)] + [torch.isfinite(p).all() for p in params]
    return torch.stack(flags).all()


def fit(
    model: nn.Module,
    clean: Split,
    info: DatasetInfo,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    lr_at: LrAt,
    step: Step,
    drop_last: bool,
    steps_per_epoch: int = 0,
) -> Iterator[EpochResult]:
    """Run ``step`` over ``epochs`` epochs of clean batches; yield after each epoch.

    ``steps_per_epoch == 0``: one shuffled pass of :class:`DeviceLoader` per epoch, its last
    partial batch dropped if ``drop_last`` and kept otherwise (``ceil(n / batch_size)`` steps).
    ``> 0``: that many full batches per epoch, indices drawn with replacement (``drop_last``
    has no effect). ``step(x, y)`` does one update and returns the detached batch loss (a 0-d
    tensor). ``lr_at(t, ipe)`` gets the global step and the steps per epoch.
    """
    device = torch.device(device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if steps_per_epoch > 0:
        data = clean.to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        ipe = steps_per_epoch
    else:
        loader = DeviceLoader(clean, info, batch_size=batch_size, device=device, seed=seed,
                              drop_last=drop_last)
        ipe = len(loader)
    for epoch in range(epochs):
        if steps_per_epoch > 0:
            batches = _with_replacement(data, info, batch_size, ipe, gen)
        else:
            batches = iter(loader)
        total = torch.zeros((), device=device)
        lr = 0.0
        for i, (x, y) in enumerate(batches):
            lr = lr_at(epoch * ipe + i, ipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total = total + step(x, y).float()
        mean_loss, finite = torch.stack([total / ipe, _all_finite(params, total).float()]).tolist()
        diverged = finite < 0.5
        yield EpochResult(epoch + 1, mean_loss, lr, diverged)
        if diverged:
            return


def prepare(model: nn.Module, device: torch.device | str, precision: str) -> torch.device:
    """Validate ``precision``, move ``model`` to ``device`` in place; return the device."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    prepare_model(model, device)
    return device


def sgd_on_all(model: Classifier, device: torch.device | str, precision: str, *, lr: float,
               momentum: float, weight_decay: float
               ) -> tuple[torch.device, list[nn.Parameter], torch.optim.SGD]:
    """The whole-model defenses' setup: prepare, train every parameter, SGD over them."""
    dev = prepare(model, device, precision)
    params = select_trainable(model, "all")
    return dev, params, torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
