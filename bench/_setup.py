"""The benchmark workload: CIFAR-shaped data built from the bundled digits, and a victim.

The trial benchmark needs 2,500 clean 32x32 RGB images to fine-tune on and 10,000 clean plus
9,000 triggered images to evaluate, with no download. Digits upsampled to 32x32 and repeated on
three channels give real, learnable images of that shape; the counts are reached by drawing with
replacement (1,078 train and 719 test images exist), which changes nothing for the timing and
keeps ACC/ASR meaningful for the reference comparison.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from zoo.attacks import make_attack
from zoo.data import DatasetInfo, Split, Splits, load_splits
from zoo.train import Recipe, default_recipe, train_victim
from zoo.victims import ZooSpec, get_victims

INFO = DatasetInfo("digits32", 3, 32, 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), hflip=False, pad=4)

# Victim training for the benchmark: long enough for a real backdoor with the small CNN; the
# ResNet gets a short run (its trial timing does not depend on how well the victim was trained).
VICTIM_RECIPES = {
    "cnn": Recipe(epochs=20, batch_size=64, lr=0.05),
    "preact-resnet18": Recipe(epochs=2, batch_size=64, lr=0.05),
}



@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the issue's (default) or ``--quick``'s (plumbing checks in seconds)."""

    n_clean: int = 2500
    n_test: int = 10_000
    n_triggered: int = 9_000
    epochs: int = 10


FULL = Sizes()
QUICK = Sizes(n_clean=256, n_test=1000, n_triggered=900, epochs=2)


def victim_recipe(arch: str, victim_epochs: int | None = None) -> Recipe:
    """The benchmark's victim recipe for ``arch``, with ``epochs`` replaced when given."""
    recipe = VICTIM_RECIPES[arch]
    return recipe if victim_epochs is None else dataclasses.replace(recipe, epochs=victim_epochs)


@dataclass
class Workload:
    info: DatasetInfo
    clean: Split  # the defender's 2,500 images
    test: Split  # 10,000 clean evaluation images
    triggered: Split  # 9,000 triggered non-target images, true labels
    target: int
    victim: dict[str, torch.Tensor]
    victim_seconds: float


def _to32(split: Split) -> Split:
    x = F.interpolate(split.x.float(), size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return Split(x, split.y.clone())


def _draw(split: Split, n: int, gen: torch.Generator) -> Split:
    return split.subset(torch.randint(0, len(split), (n,), generator=gen))


def make_workload(arch: str, *, device: torch.device, seed: int = 0, sizes: Sizes = FULL,
                  victim_epochs: int | None = None, progress: bool = True) -> Workload:
    """Digits at 32x32 RGB, a badnets victim of ``arch`` (trained on ``device``) and the
    clean / evaluation sets of ``sizes``, drawn with replacement from ``seed``."""
    base = load_splits("digits", seed=seed)
    train, test = _to32(base.train), _to32(base.test)
    gen = torch.Generator().manual_seed(seed)
    splits = Splits(INFO, train, _draw(train, sizes.n_clean, gen), test, test)
    attack = make_attack("badnets", INFO, seed=seed)
    start = time.perf_counter()
    victim, _ = train_victim(attack, splits, arch, poison_rate=0.1, recipe=victim_recipe(arch, victim_epochs),
                             seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - start
    trig = attack.triggered(test)
    return Workload(INFO, splits.clean, _draw(test, sizes.n_test, gen),
                    _draw(trig, sizes.n_triggered, gen),
                    attack.target, victim, seconds)


# -- digits victims from the zoo (scaling, overhead, packing) ----------------------------------
DIGITS_ATTACKS = ("badnets", "blended", "wanet", "sig")  # the default search attacks


def digits_victims(attacks: tuple[str, ...] = DIGITS_ATTACKS, *, victim_epochs: int | None = None,
                   seed: int = 0, zoo_dir: str | None = None,
                   clean_ratio: float | None = None) -> tuple[Splits, list]:
    """The digits splits and the zoo's cnn victims of ``attacks`` (built once, then stored).

    ``victim_epochs`` replaces the recipe's epochs (a separate store entry), as the tuner's
    ``--smoke-test`` does; None keeps the documented digits recipe.
    """
    recipe = None
    if victim_epochs is not None:
        recipe = dataclasses.replace(default_recipe("digits", "cnn"), epochs=victim_epochs)
    zoo = Path(zoo_dir) if zoo_dir is not None else None
    spec = ZooSpec("digits", arch="cnn", seed=seed, zoo_dir=zoo, recipe=recipe,
                   attacks=tuple(attacks), clean_ratio=clean_ratio, device="cpu")
    splits = spec.load_splits()
    return splits, get_victims(spec, splits=splits, progress=False)


# -- CIFAR-shaped data through the real cifar10 reader (packing, gpu) --------------------------
CIFAR_TRAIN = 50_000  # as CIFAR-10: the defender's 5% is 2,500 images


def write_cifar_shaped(root: Path, *, n_train: int = CIFAR_TRAIN, n_test: int = 10_000,
                       seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` in CIFAR-10's own format (five training batches and a test
    batch, the python pickles ``zoo.readers.read_cifar10`` reads) holding digits at 32x32 RGB,
    drawn with replacement from the digits train and val+test images respectively; ``root``
    returned, for ``ZooSpec(dataset="cifar10", data_root=root)``. Victims built from it must go
    to a store of their own (their key says cifar10)."""
    base = load_splits("digits", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    held_out = Split(torch.cat([base.val.x, base.test.x]), torch.cat([base.val.y, base.test.y]))
    train, test = _draw(_to32(base.train), n_train, gen), _draw(_to32(held_out), n_test, gen)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [round(i * n_train / 5) for i in range(6)]
    parts = {f"data_batch_{i + 1}": train.subset(torch.arange(bounds[i], bounds[i + 1]))
             for i in range(5)}
    for name, split in {**parts, "test_batch": test}.items():
        batch = {b"data": split.x.reshape(len(split), -1).numpy(),
                 b"labels": split.y.tolist()}
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return root
