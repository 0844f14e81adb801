"""Datasets as uint8 tensors with fixed, seeded splits.

Every source returns raw ``(x_train, y_train, x_test, y_test)`` arrays (uint8 NCHW, int64
labels); :func:`load_splits` turns them into four splits:

- ``train``: what the attacker poisons (the whole training set);
- ``clean``: the defender's clean data, ``clean_ratio`` of the clean training set, class-balanced
  by default (``floor(N * ratio / C)`` images per class, as BackdoorBench's ``choose_by_class``);
- ``val`` and ``test``: disjoint halves of the test set, stratified by class. ``val`` drives the
  search; ``test`` is only reported for chosen configurations.

Images are kept as uint8 so a split costs one byte per pixel on the device; normalization and
augmentation happen per batch in :mod:`zoo.loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from zoo import readers
from zoo.readers import DataError, RawData

__all__ = [
    "CLEAN_RATIOS",
    "DATASETS",
    "DataError",
    "DatasetInfo",
    "RawData",
    "Split",
    "Splits",
    "dataset_info",
    "default_clean_ratio",
    "load_splits",
    "redraw_clean",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models, loaders and attacks need."""

    name: str
    channels: int
    size: int  # images are size x size
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    hflip: bool  # random horizontal flip is a valid augmentation
    pad: int  # random-crop padding in pixels


@dataclass(frozen=True)
class Split:
    """Images ``x`` (uint8, N x C x H x W) and labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8:
            raise TypeError(f"Split.x must be uint8, got {self.x.dtype}")
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"Split shapes disagree: x {tuple(self.x.shape)}, y {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train: Split
    clean: Split
    val: Split
    test: Split


# ---------------------------------------------------------------------------------------------
# Dataset facts. Normalization constants are BackdoorBench's (specs/attacks.md, section 2).
# ---------------------------------------------------------------------------------------------

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.247, 0.243, 0.261)

_INFOS: dict[str, DatasetInfo] = {
    # sklearn digits: 8x8, 17 grey levels, upsampled bilinearly to 16x16 (see _read_digits).
    "digits": DatasetInfo("digits", 1, 16, 10, (0.5,), (0.5,), hflip=False, pad=2),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), hflip=False, pad=2),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, _CIFAR_MEAN, _CIFAR_STD, hflip=True, pad=4),
    # BackdoorBench: GTSRB is not normalized and not flipped.
    "gtsrb": DatasetInfo("gtsrb", 3, 32, 43, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=False, pad=4),
}

# The defender's clean share of the training set. BackdoorBench uses 5%; digits has only
# 1,078 training images, so 5% would leave ~5 images per class: 10% keeps ~10 per class.
CLEAN_RATIOS = {"digits": 0.1, "mnist": 0.05, "cifar10": 0.05, "gtsrb": 0.05, "imagefolder": 0.05}


def default_clean_ratio(name: str) -> float:
    return CLEAN_RATIOS[name]


def dataset_info(name: str, raw: RawData | None = None) -> DatasetInfo:
    """Facts for ``name``; ``imagefolder`` needs the raw data to know its shape and classes."""
    if name in _INFOS:
        return _INFOS[name]
    if name == "imagefolder" and raw is not None:
        c, h = int(raw.x_train.shape[1]), int(raw.x_train.shape[2])
        k = int(max(raw.y_train.max(), raw.y_test.max())) + 1
        x = raw.x_train.astype(np.float64) / 255.0
        mean = tuple(float(v) for v in x.mean(axis=(0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in x.std(axis=(0, 2, 3)))
        return DatasetInfo("imagefolder", c, h, k, mean, std, hflip=False, pad=max(1, h // 8))
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _read_digits(root: Path | None, download: bool) -> RawData:
    """scikit-learn's bundled digits (1,797 images), upsampled 8x8 -> 16x16.

    There is no official test set: a stratified 60/40 split with a fixed seed (1,078 train,
    719 test) stands in for it. 16x16 keeps a 3x3 BadNets patch and WaNet's 4x4 control grid
    meaningful while a small CNN trains in seconds on a CPU.
    """
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]  # ~1 s to import: only for this dataset
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # N,1,8,8
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    x = (up.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    return RawData(x_tr, y_tr, x_te, y_te)


SOURCES: dict[str, Callable[[Path | None, bool], RawData]] = {
    "digits": _read_digits,
    "mnist": readers.read_mnist,
    "cifar10": readers.read_cifar10,
    "gtsrb": readers.read_gtsrb,
    "imagefolder": readers.read_imagefolder,
}
DATASETS = tuple(SOURCES)


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def _clean_indices(y: np.ndarray, ratio: float, balanced: bool, rng: np.random.Generator) -> np.ndarray:
    n = len(y)
    if balanced:
        classes = np.unique(y)
        per_class = int(n * ratio) // len(classes)
        if per_class < 1:
            raise DataError(
                f"clean ratio {ratio} gives fewer than 1 image per class for {n} training images "
                f"and {len(classes)} classes: expected a larger --clean-ratio"
            )
        picks = []
        for c in classes:
            idx = np.flatnonzero(y == c)
            picks.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        return np.sort(np.concatenate(picks))
    k = max(1, int(round(n * ratio)))
    return np.sort(rng.choice(n, size=k, replace=False))


def _val_test_indices(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified halves of the test set: every class split as evenly as it goes."""
    val, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        half = len(idx) // 2
        val.append(idx[:half])
        test.append(idx[half:])
    return np.sort(np.concatenate(val)), np.sort(np.concatenate(test))


def load_splits(
    name: str,
    *,
    data_root: str | Path | None = None,
    seed: int = 0,
    clean_ratio: float | None = None,
    balanced: bool = True,
    download: bool = False,
) -> Splits:
    """Load ``name`` and split it, reproducibly from ``seed``.

    >>> s = load_splits("digits")
    >>> s.info.size, len(s.train), len(s.val) + len(s.test)
    (16, 1078, 719)
    """
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    ratio = default_clean_ratio(name) if clean_ratio is None else float(clean_ratio)
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"clean ratio {ratio} is outside (0, 1]")
    root = Path(data_root).expanduser() if data_root is not None else None
    raw = SOURCES[name](root, download)
    info = dataset_info(name, raw)
    rng = np.random.default_rng(seed)
    clean_idx = _clean_indices(raw.y_train, ratio, balanced, rng)
    val_idx, test_idx = _val_test_indices(raw.y_test, rng)

    def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray | None = None) -> Split:
        if idx is not None:
            x, y = x[idx], y[idx]
        return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))

    return Splits(
        info=info,
        train=split(raw.x_train, raw.y_train),
        clean=split(raw.x_train, raw.y_train, clean_idx),
        val=split(raw.x_test, raw.y_test, val_idx),
        test=split(raw.x_test, raw.y_test, test_idx),
    )


def redraw_clean(splits: Splits, *, seed: int, dataset: str, clean_ratio: float | None = None,
                 balanced: bool = True) -> Splits:
    """``splits`` with the defender's clean subset drawn again from ``seed``, as
    :func:`load_splits` draws it with that seed; train, val and test unchanged (so the victims
    and their val/test metrics still hold). ``--trial-seeds`` uses it.

    >>> s = load_splits("digits")
    >>> bool((redraw_clean(s, seed=0, dataset="digits").clean.y == s.clean.y).all())
    True
    """
    ratio = default_clean_ratio(dataset) if clean_ratio is None else float(clean_ratio)
    idx = _clean_indices(splits.train.y.numpy(), ratio, balanced, np.random.default_rng(seed))
    return replace(splits, clean=splits.train.subset(torch.from_numpy(idx)))
