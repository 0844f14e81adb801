"""LP (linear probing): a baseline of FST (Min et al., NeurIPS 2023, arXiv 2310.01875).

Official code: AISafety-HKUST/stable_backdoor_purification ``fine_tune/ft.py --ft_mode``.
Rule: tune the head only; the backbone, BatchNorm statistics included, stays frozen; SGD
momentum 0.9, no weight decay, cosine lr over epochs; the head's Frobenius norm is projected
back to the backdoored head's norm C after every step, as the official script does in every mode
(``project_head_norm``). The loop, re-init and projection are FST's
(:func:`defenses.fst.run_mode`); see ``fst.py`` for the symbols table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from defenses import fst
from defenses._engine import EpochResult
from zoo.data import DatasetInfo, Split

NAME = "lp"

OVERRIDES = fst.BASELINE_OVERRIDES


@dataclass(frozen=True)
class Config(fst.BaselineConfig):
    """FST's defaults without the shift penalty (fields documented in fst.BaselineConfig)."""


def run(model: nn.Module, clean: Split, info: DatasetInfo, cfg: Config, *, seed: int,
        device: torch.device | str, precision: str = "auto") -> Iterator[EpochResult]:
    """LP (linear probing) on ``model`` in place; yield after each epoch."""
    return fst.run_mode(fst.MODES[NAME], model, clean, info, cfg, seed=seed, device=device,
                        precision=precision)
