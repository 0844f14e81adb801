"""``python -m bench scaling``: seconds per trial against clean-set size and number of attacks.

One configuration (the defense's digits defaults) run as a search trial runs it
(:func:`tuner.evaluation.trial_epochs`: every victim interleaved, val measured after each
epoch), on the digits cnn victims:

- clean-set size: ``clean_ratio`` 1%, 2%, 5%, 10% of the 1,078 training images (balanced: 1, 2,
  5 and 10 images per class), one victim (badnets). The cost per clean image is
  ``train_seconds / clean images``; below one batch per epoch the step count stays at one, so
  the smallest sizes are flat rather than linear.
- attacks: 1, 2, 4 and 8 victims. Digits has four search attacks (badnets, blended, wanet,
  sig); 8 repeats each once more under a new name (``badnets#2``...), which costs the same as an
  eighth distinct attack would. The cost per attack is ``seconds / attacks``.

Linear growth shows as a flat per-unit column.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from bench._setup import DIGITS_ATTACKS, digits_victims
from tuner.evaluation import trial_epochs
from zoo.data import Splits, load_splits

CLEAN_RATIOS = (0.01, 0.02, 0.05, 0.10)
ATTACK_COUNTS = (1, 2, 4, 8)


def time_trial(defense: str, victims: list, splits: Splits, *, seed: int, device: torch.device,
               epochs: int | None) -> dict[str, float]:
    """Wall seconds of one trial (all epochs, val after each) and its epoch count."""
    start = time.perf_counter()
    n = sum(1 for _ in trial_epochs(defense, None, victims, splits, seed=seed, device=device, max_epochs=epochs))
    return {"seconds": time.perf_counter() - start, "epochs": n}


def repeat_victims(victims: list, n: int) -> list:
    """``n`` victims: the given ones in turn, repeats renamed ``<attack>#<k>``."""
    out = []
    for i in range(n):
        v = victims[i % len(victims)]
        k = i // len(victims)
        out.append(v if k == 0 else dataclasses.replace(v, attack=f"{v.attack}#{k + 1}"))
    return out


def by_clean_size(defense: str, victims: list, base: Splits, *, ratios: tuple[float, ...],
                  seed: int, device: torch.device, epochs: int | None) -> list[dict[str, Any]]:
    """One victim; the clean set of each ratio, val/test kept from ``base`` (the victims')."""
    rows = []
    for ratio in ratios:
        clean = load_splits("digits", seed=seed, clean_ratio=ratio).clean
        splits = dataclasses.replace(base, clean=clean)
        r = time_trial(defense, victims[:1], splits, seed=seed, device=device, epochs=epochs)
        n = len(splits.clean)
        rows.append({"clean_ratio": ratio, "clean_images": n, **r,
                     "ms_per_clean_image": 1000.0 * r["seconds"] / n})
    return rows


def by_attacks(defense: str, victims: list, splits: Splits, *, counts: tuple[int, ...], seed: int,
               device: torch.device, epochs: int | None) -> list[dict[str, Any]]:
    """``n`` victims per trial for each ``n`` of ``counts`` (repeats beyond the attacks)."""
    rows = []
    for n in counts:
        r = time_trial(defense, repeat_victims(victims, n), splits, seed=seed, device=device,
                       epochs=epochs)
        rows.append({"attacks": n, **r, "seconds_per_attack": r["seconds"] / n})
    return rows


def run_scaling(defense: str, *, device: torch.device, seed: int = 0, epochs: int | None = None,
                victim_epochs: int | None = None, zoo_dir: str | None = None,
                ratios: tuple[float, ...] = CLEAN_RATIOS,
                counts: tuple[int, ...] = ATTACK_COUNTS,
                attacks: tuple[str, ...] = DIGITS_ATTACKS) -> dict[str, Any]:
    """Both sweeps; ``epochs`` caps the defense's epochs (None: its digits default)."""
    splits, victims = digits_victims(attacks, victim_epochs=victim_epochs, seed=seed,
                                     zoo_dir=zoo_dir)
    time_trial(defense, victims[:1], splits, seed=seed, device=device, epochs=1)  # warm-up
    return {
        "defense": defense,
        "clean_size": by_clean_size(defense, victims, splits, ratios=ratios, seed=seed, device=device,
                                    epochs=epochs),
        "attacks": by_attacks(defense, victims, splits, counts=counts, seed=seed, device=device,
                              epochs=epochs),
    }
