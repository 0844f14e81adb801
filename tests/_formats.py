"""Small dataset files in their published formats, and tiny attack settings, shared by tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def cifar_batch(n: int, seed: int, *, cycle_labels: bool = False) -> dict[bytes, object]:
    """One CIFAR-10 python batch: ``n`` random 32x32 RGB rows; labels random or 0..9 cycling."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10 if cycle_labels else rng.integers(0, 10, n)
    return {
        b"batch_label": f"batch {seed}".encode(),
        b"labels": [int(v) for v in labels],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar(root: Path, n: int = 20, protocol: int = 2, *,
                cycle_labels: bool = False) -> dict[str, dict[bytes, object]]:
    """``ROOT/cifar-10-batches-py/`` with five training batches and a test batch of ``n`` each
    (cycling labels give every class the same count, as the clean-label attacks need)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i, cycle_labels=cycle_labels) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n, 99, cycle_labels=cycle_labels)
    for name, batch in batches.items():
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return batches


# Tiny auxiliary builds for the prepared attacks: a few steps each, so a test runs in seconds.
SMALL_ATTACK_PARAMS: dict[str, dict[str, object]] = {
    "lf": {"n_images": 8, "max_passes": 2, "max_iter": 10},
    "lc": {"steps": 3, "at_epochs": 1},
    "trojannn": {"steps": 5},
    "inputaware": {"mask_epochs": 1, "width": 4},
    "ssba": {"steps": 5, "width": 4, "bits": 8, "batch_size": 16},
    "bpp": {},
}
