"""The attack protocol and the data-poisoning plumbing every attack shares.

Shared rules (BackdoorBench, specs/attacks.md section 1):

- all-to-one: poisoned training images are relabelled to ``target`` (class 0 by default);
- dirty-label attacks poison ``round(rate * N)`` images drawn uniformly, without replacement,
  from the *whole* training set, target-class images included;
- clean-label attacks poison ``round(rate * N)`` images drawn only from the target class, the rate
  still counted against the whole training set N; labels are left alone;
- triggers are computed in float on raw 0..255 images, clipped to [0, 255], then *truncated* to
  uint8 (as BackdoorBench's ``astype(np.uint8)``), before any augmentation;
- the triggered evaluation set holds every non-target image, triggered, with its TRUE label
  (ASR = share predicted as the target, RA = share predicted as the true label).

Departure: BackdoorBench draws indices with numpy's global RNG after ``fix_random``; here the draw
uses ``numpy.random.default_rng(seed)``, so the indices differ but are equally reproducible.
Departure: a clean-label count that exceeds the target class by at most 2% (rounding on a nearly
balanced split, e.g. digits at rate 0.1: 108 asked, 107 in class 0) poisons the whole class, which
is what rate 0.1 means for BackdoorBench's CIFAR-10 (5,000 = all of class 0).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from zoo.classifier import Classifier
from zoo.data import DatasetInfo, Split
from zoo.runtime import Precision

__all__ = ["Attack", "clean_label_count", "poison_count", "poison_indices", "to_uint8"]

# Largest share by which a clean-label request may exceed the target class and still mean
# "the whole class" (see the module docstring).
_CLASS_SLACK = 0.02


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clip a float image to [0, 255] and truncate (not round) to uint8, as BackdoorBench."""
    return x.clamp(0.0, 255.0).to(torch.uint8)


def poison_count(n: int, rate: float) -> int:
    """``round(rate * n)``, the number of poisoned training images; raises when it is 0."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"poison rate {rate}: expected a number in (0, 1)")
    count = round(rate * n)
    if count < 1:
        raise ValueError(
            f"poison rate {rate} poisons 0 of {n} training images: "
            f"expected --poison-rate >= {math.ceil(0.5 / n * 1e6) / 1e6:g}"
        )
    return count


def clean_label_count(y: torch.Tensor, rate: float, target: int) -> int:
    """Clean-label count: ``round(rate * N)`` capped at the target class within 2% slack."""
    n = len(y)
    count = poison_count(n, rate)
    available = int((y == target).sum())
    if count <= available:
        return count
    if available > 0 and count <= available * (1.0 + _CLASS_SLACK):
        return available
    max_rate = math.floor(available / n * 1000) / 1000
    raise ValueError(
        f"poison rate {rate} needs {count} target-class images but class {target} has {available}: "
        f"expected --poison-rate <= {max_rate:g} for a clean-label attack"
    )


def poison_indices(y: torch.Tensor, rate: float, *, target: int, clean_label: bool, seed: int) -> torch.Tensor:
    """Sorted indices of the training images to poison, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = y.cpu().numpy()
    if clean_label:
        pool = np.flatnonzero(labels == target)
        count = clean_label_count(y, rate, target)
    else:
        pool = np.arange(len(labels))
        count = poison_count(len(labels), rate)
    picked = rng.choice(pool, size=count, replace=False)
    return torch.from_numpy(np.sort(picked)).to(torch.long)


class Attack(ABC):
    """One backdoor attack: a trigger (reproducible from ``state()``) and a poisoning rule.

    Subclasses set ``name``, ``clean_label``, ``dynamic`` (True when the poisoned training set
    changes every epoch), ``_ctor_params`` (constructor keywords recorded in ``params()``) and
    ``_state_names`` (tensor attributes saved by ``state()``), and implement ``apply``.

    Attacks whose trigger must be built first (LF, LC, TrojanNN, SSBA, Input-aware) set
    ``needs_preparation``; :func:`zoo.victims.get_victims` then calls ``prepare`` once, before
    training, and whatever it builds is part of ``state()``. Those that need the clean model of
    the same dataset and arch also set ``needs_clean_model``: get_victims records the clean
    victim's store key in ``params()["clean_model"]`` (so it enters the victim's key) and hands
    ``prepare`` a function that loads (or builds) that model. An attack that trains jointly with
    the victim (Input-aware) sets ``custom_training`` and implements ``fit_victim``, which
    :func:`zoo.train.train_victim` then calls instead of its own loop.
    """

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False
    dynamic: ClassVar[bool] = False
    needs_preparation: ClassVar[bool] = False
    needs_clean_model: ClassVar[bool] = False
    custom_training: ClassVar[bool] = False
    _ctor_params: ClassVar[tuple[str, ...]] = ()
    _state_names: ClassVar[tuple[str, ...]] = ()
    # The clean victim's store key: a constructor keyword of the ``needs_clean_model`` attacks
    # (in their ``_ctor_params``), which get_victims sets; other attacks have no such attribute.
    clean_model: str | None

    def __init__(self, info: DatasetInfo, *, target: int = 0, seed: int = 0) -> None:
        if not 0 <= int(target) < info.num_classes:
            raise ValueError(f"target class {target}: expected 0..{info.num_classes - 1} for {info.name}")
        self.info = info
        self.target = int(target)
        self.seed = int(seed)

    # -- identity and persistence -----------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """JSON-able description: everything that determines the attack (enters the store key)."""
        out: dict[str, Any] = {"name": self.name, "target": self.target, "seed": self.seed}
        for key in self._ctor_params:
            out[key] = getattr(self, key)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The trigger's tensors (patterns, grids), enough for ``restore`` to reproduce ``apply``."""
        return {k: getattr(self, k).detach().cpu().clone().contiguous() for k in self._state_names}

    @classmethod
    def restore(cls, info: DatasetInfo, params: dict[str, Any], state: dict[str, torch.Tensor]) -> Attack:
        """Rebuild an attack from ``params()`` and ``state()``; ``apply`` is then bit-identical."""
        if params.get("name") != cls.name:
            raise ValueError(f"attack params name {params.get('name')!r}: expected {cls.name!r}")
        kwargs = {k: params[k] for k in ("target", "seed", *cls._ctor_params) if k in params}
        obj = cls(info, **kwargs)
        obj._load_state(state)
        obj._check_restored(params)
        return obj

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._state_names) - set(state)
        if missing:
            raise ValueError(f"{self.name} state lacks {sorted(missing)}: expected {list(self._state_names)}")
        for k in self._state_names:
            fresh, saved = getattr(self, k), state[k]
            if saved.shape != fresh.shape or saved.dtype != fresh.dtype:
                raise ValueError(
                    f"{self.name} state {k!r} has shape {tuple(saved.shape)} {saved.dtype}: "
                    f"expected {tuple(fresh.shape)} {fresh.dtype}"
                )
            setattr(self, k, saved.detach().cpu().clone())

    def _check_restored(self, params: dict[str, Any]) -> None:
        """Hook: verify that the loaded state agrees with ``params`` (e.g. a pattern hash)."""

    # -- preparation (optional) ---------------------------------------------------------------

    def prepare(
        self,
        splits: Any,
        clean_model: Callable[[], Classifier] | None,
        device: torch.device,
        progress: bool = True,
    ) -> None:
        """Build the trigger from ``splits`` (and the clean model, when needed); default: nothing."""

    def fit_victim(self, model: torch.nn.Module, opt: torch.optim.Optimizer, train: Split, info: DatasetInfo, *,
                   poison_rate: float, recipe: Any, seed: int, device: torch.device,
                   report: Callable[[int, float], None], precision: Precision = "fp32") -> None:
        """Train ``model`` in place (only for ``custom_training`` attacks); ``report(epoch, loss)``;
        ``precision`` as the other victims train (fp32 on a CPU, so builds do not depend on its
        bf16 support)."""
        raise NotImplementedError(f"{self.name} has no own training loop: expected custom_training = True")

    # -- the trigger -------------------------------------------------------------------------

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Trigger a batch of uint8 N,C,H,W images; deterministic given the state."""

    # -- poisoning ---------------------------------------------------------------------------

    def check(self, train: Split, poison_rate: float) -> None:
        """Raise ValueError if ``poison_rate`` cannot poison ``train`` (before any training)."""
        if self.clean_label:
            clean_label_count(train.y, poison_rate, self.target)
        else:
            poison_count(len(train), poison_rate)

    def training_set(self, train: Split, *, poison_rate: float, epoch: int, seed: int) -> Split:
        """The poisoned training set (static attacks: the same for every epoch)."""
        idx = poison_indices(train.y, poison_rate, target=self.target, clean_label=self.clean_label, seed=seed)
        x, y = train.x.clone(), train.y.clone()
        dev_idx = idx.to(x.device)
        x[dev_idx] = self.apply(x[dev_idx])
        if not self.clean_label:
            y[dev_idx] = self.target
        return Split(x, y)

    def apply_test(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger at test time; the training trigger unless the attack says otherwise (SIG)."""
        return self.apply(x)

    def triggered(self, split: Split) -> Split:
        """Every non-target image of ``split``, triggered, with its TRUE label."""
        keep = split.y != self.target
        return Split(self.apply_test(split.x[keep]), split.y[keep])

    def _check_images(self, x: torch.Tensor) -> None:
        i = self.info
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (i.channels, i.size, i.size):
            raise ValueError(
                f"{self.name}.apply got {x.dtype} {tuple(x.shape)}: expected uint8 N x "
                f"{i.channels} x {i.size} x {i.size} for {i.name}"
            )
