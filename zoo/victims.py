"""The zoo: one backdoored victim per attack, built once and kept in the store.

A victim's store key hashes everything that determines it: dataset, split seed, arch, attack
name and ``params()`` (trigger seed and target included), poison rate (None for the clean
model, which does not depend on it), the training recipe, and the store's format version.
Each entry holds two tensor groups, ``model`` (the state_dict) and ``attack`` (the trigger's
state), and its no-defense metrics on val and test in ``meta``.

>>> from zoo.victims import ZooSpec, get_victims
>>> victims = get_victims(ZooSpec("digits"), ["badnets"])   # doctest: +SKIP
>>> victims[0].metrics["test"].asr                          # doctest: +SKIP
100.0
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.attacks import (
    ATTACKS,
    DEFAULT_ATTACKS,
    DEFAULT_POISON_RATE,
    Attack,
    check_attack_names,
    dataset_defaults,
    make_attack,
    restore_attack,
)
from zoo.data import CLEAN_RATIOS, DATASETS, DataError, DatasetInfo, Split, Splits, load_splits
from zoo.metrics import Metrics, evaluate
from zoo.models import ARCHS, Classifier, build_model
from zoo.runtime import PRECISIONS, Precision, pick_device, prepare_model, reproducible_precision
from zoo.store import Store
from zoo.train import Recipe, default_recipe, train_victim

__all__ = ["Victim", "ZooSpec", "get_victims", "prepare_attacks", "victim_description"]


MAX_SEED = 2**31 - 1  # every seed consumer (numpy, torch, derived loader seeds) accepts it


def _opt(help_text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata read by the command line (``tuner.flags``): help text and extras."""
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class ZooSpec:
    """Which victims, from which data, trained how; every value checked on construction.

    ``recipe=None`` means :func:`zoo.train.default_recipe`. ``clean_ratio``, ``attacks``,
    ``device`` and ``precision`` do not determine a victim (they are not part of its key).
    Bad values raise :class:`zoo.data.DataError` naming the flag and what was expected.
    """

    dataset: str = field(default="digits", metadata=_opt(
        "dataset: digits is bundled; the others are read from --data-root", choices=DATASETS))
    data_root: Path | None = field(default=None, metadata=_opt(
        "folder holding the dataset files (not needed for digits)"))
    download: bool = field(default=False, compare=False, metadata=_opt(
        "mnist, cifar10, gtsrb: fetch the files into --data-root with torchvision's "
        "downloaders when they are missing (needs a network)", resource=True))
    arch: str = field(default="cnn", metadata=_opt("victim model architecture", choices=ARCHS))
    attacks: tuple[str, ...] = field(default=DEFAULT_ATTACKS, compare=False, metadata=_opt(
        "comma-separated attacks, one victim each ('none' is the clean model)",
        choices=tuple(ATTACKS), smoke=("badnets",)))
    poison_rate: float | None = field(default=None, metadata=_opt(
        "share of the training set the attacker poisons, in (0, 1), for every attack",
        default_text=f"{DEFAULT_POISON_RATE}, or an attack's documented default on the dataset"))
    clean_ratio: float | None = field(default=None, compare=False, metadata=_opt(
        "defender's clean share of the training set, in (0, 1]",
        default_text="per dataset: " + ", ".join(f"{k} {v:g}" for k, v in CLEAN_RATIOS.items())))
    seed: int = field(default=0, metadata=_opt(
        f"seed of the data split, the triggers and the victims' training, 0..{MAX_SEED}"))
    # The victims' own seed (trigger, poisoned indices, training) where it differs from the
    # split's: the final evaluation's --victim-seeds. It enters the key through the attack's
    # params (their "seed"), so stored victims of the default (None) keep their keys.
    victim_seed: int | None = field(default=None, metadata={"cli": False})
    zoo_dir: Path | None = field(default=None, metadata=_opt(
        "victim store", default_text="$XDG_CACHE_HOME/backdoor-ft-tuner/zoo"))
    blend_image: Path | None = field(default=None, metadata=_opt(
        "image file for the Blended trigger", default_text="a seeded noise pattern"))
    device: str = field(default="auto", compare=False, metadata=_opt(
        "auto (CUDA if present), cpu or cuda[:N]", resource=True))
    precision: Precision = field(default="auto", compare=False, metadata=_opt(
        "auto: bf16 autocast where the hardware has native bf16 (CUDA, or a CPU with "
        "AMX/AVX512-BF16), fp32 elsewhere; fp32 or bf16 to force one", resource=True))
    recipe: Recipe | None = field(default=None, metadata={"cli": False})
    # Per-attack parameter overrides, e.g. {"ssba": {"steps": 50}}; they enter params() and the key.
    attack_params: dict[str, dict[str, Any]] | None = field(
        default=None, hash=False, metadata={"cli": False})

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("data_root", "zoo_dir", "blend_image"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, Path(value).expanduser().absolute())
        set_(self, "attacks", tuple(self.attacks))
        if self.dataset not in DATASETS:
            raise DataError(f"unknown dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}")
        if self.arch not in ARCHS:
            raise DataError(f"unknown model {self.arch!r}: expected one of {', '.join(ARCHS)}")
        check_attack_names(self.attacks, "--attacks")
        if self.poison_rate is not None and not 0.0 < self.poison_rate < 1.0:
            raise DataError(f"--poison-rate {self.poison_rate}: expected a number in (0, 1)")
        if self.clean_ratio is not None and not 0.0 < self.clean_ratio <= 1.0:
            raise DataError(f"--clean-ratio {self.clean_ratio}: expected a number in (0, 1]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed <= MAX_SEED:
            raise DataError(f"--seed {self.seed!r}: expected a whole number in 0..{MAX_SEED}")
        if self.dataset != "digits" and self.data_root is None:
            raise DataError(f"--data-root is required for dataset {self.dataset!r} "
                            "(only digits is bundled)")
        if self.blend_image is not None and not self.blend_image.is_file():
            raise DataError(f"--blend-image {str(self.blend_image)!r} is not a file")
        if self.precision not in PRECISIONS:
            raise DataError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        try:
            set_(self, "device", str(pick_device(self.device)))
        except (ValueError, RuntimeError) as exc:
            raise DataError(f"--device {self.device!r}: {exc}") from None

    @property
    def training_seed(self) -> int:
        """The seed of the victims' triggers, poisoned indices and training."""
        return self.seed if self.victim_seed is None else self.victim_seed

    def load_splits(self) -> Splits:
        """The dataset split by :func:`zoo.data.load_splits` with this spec's seed and ratio."""
        return load_splits(self.dataset, data_root=self.data_root, seed=self.seed,
                           clean_ratio=self.clean_ratio, download=self.download)

    def victim_precision(self, device: torch.device) -> str:
        """Victims train in fp32 on CPU, so a store's victims do not depend on the CPU's bf16
        support (the defenses' trials use bf16 where the CPU has it); bf16 on CUDA."""
        return reproducible_precision(device, self.precision)

    def training_recipe(self, attack: str | None = None) -> Recipe:
        """The user's recipe, else the documented one for ``attack`` on this dataset and arch."""
        return self.recipe or default_recipe(self.dataset, self.arch, attack)

    def rate_for(self, attack: str) -> float:
        """The poison rate of ``attack``: the user's, else the zoo's default on this dataset."""
        if self.poison_rate is not None:
            return self.poison_rate
        return float(dataset_defaults(self.dataset, attack).get("poison_rate", DEFAULT_POISON_RATE))

    def attack_params_for(self, attack: str) -> dict[str, Any]:
        """Constructor parameters of ``attack``: the dataset's defaults, then the user's."""
        params = dataset_defaults(self.dataset, attack)
        params.pop("poison_rate", None)
        params.update((self.attack_params or {}).get(attack, {}))
        return params


@dataclass
class Victim:
    """One trained victim with its trigger and its no-defense metrics (plain, picklable)."""

    attack: str
    dataset: str
    arch: str
    info: DatasetInfo
    target: int
    state_dict: dict[str, torch.Tensor]
    attack_obj: Attack
    bd_val: Split
    bd_test: Split
    metrics: dict[str, Metrics]
    key: str
    seconds: float  # build time (training + evaluation) if built, load time if loaded
    built: bool
    train_seconds: float = 0.0  # training time recorded when the victim was built
    poison_rate: float | None = None  # None for the clean model

    def model(self, device: torch.device | str = "cpu") -> Classifier:
        """A fresh model with the victim's weights, on ``device`` (left in train mode)."""
        model = build_model(self.arch, self.info)
        model.load_state_dict(self.state_dict)
        return prepare_model(model, torch.device(device))


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be wrong is caught before anything is trained or written.
# ---------------------------------------------------------------------------------------------


def prepare_attacks(spec: ZooSpec, attacks: Sequence[str] | None, splits: Splits
                    ) -> dict[str, Attack]:
    """Build each attack (``spec.attacks`` when None), checking its poison rate against the data.

    Raises DataError (one line, naming the bad value) before any training happens.
    """
    attacks = spec.attacks if attacks is None else tuple(attacks)
    check_attack_names(attacks, "attacks")
    out: dict[str, Attack] = {}
    for name in dict.fromkeys(attacks):
        extra = spec.attack_params_for(name)
        if name == "blended" and spec.blend_image is not None:
            extra["image"] = spec.blend_image
        attack = make_attack(name, splits.info, seed=spec.training_seed, **extra)
        if attack.needs_clean_model:  # the clean model's key enters this victim's key
            attack.clean_model = _clean_key(spec, splits.info)
        try:
            attack.check(splits.train, spec.rate_for(name))
        except ValueError as exc:
            raise DataError(f"{name}: {exc}") from None
        out[name] = attack
    return out


def victim_description(spec: ZooSpec, attack: Attack) -> dict[str, Any]:
    """What the store key hashes (the store adds its format version)."""
    return {
        "kind": "victim",
        "dataset": spec.dataset,
        "split_seed": spec.seed,
        "arch": spec.arch,
        "attack": attack.name,
        "attack_params": attack.params(),
        "poison_rate": None if attack.name == "none" else spec.rate_for(attack.name),
        "recipe": asdict(spec.training_recipe(attack.name)),
    }


# ---------------------------------------------------------------------------------------------
# Build or load
# ---------------------------------------------------------------------------------------------


def _open_store(spec: ZooSpec) -> Store:
    return Store(spec.zoo_dir if spec.zoo_dir is not None else Store.default_root())


def _clean_key(spec: ZooSpec, info: DatasetInfo) -> str:
    """Store key of the clean (``none``) victim of ``spec``: what model-dependent triggers come from."""
    return Store.key(victim_description(spec, make_attack("none", info, seed=spec.training_seed)))


def _prepare(spec: ZooSpec, attack: Attack, splits: Splits, device: torch.device, progress: bool) -> float:
    """Run ``attack.prepare`` (with a loader of the clean model when it needs one); returns seconds."""
    if not attack.needs_preparation:
        return 0.0
    start = time.perf_counter()

    def clean_model() -> Classifier:
        (clean,) = get_victims(spec, ["none"], splits=splits, device=device, progress=progress)
        return clean.model(device)

    attack.prepare(splits, clean_model if attack.needs_clean_model else None, device, progress)
    return time.perf_counter() - start


def _build(spec: ZooSpec, attack: Attack, splits: Splits, device: torch.device, progress: bool
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    start = time.perf_counter()
    prepare_s = _prepare(spec, attack, splits, device, progress)
    recipe = spec.training_recipe(attack.name)
    rate = spec.rate_for(attack.name)
    precision = spec.victim_precision(device)
    state, train_s = train_victim(attack, splits, spec.arch, poison_rate=rate, recipe=recipe,
                                  seed=spec.training_seed, device=device, progress=progress,
                                  precision=precision)
    model = build_model(spec.arch, splits.info)
    model.load_state_dict(state)
    model = prepare_model(model, device)
    metrics = {
        name: evaluate(model, clean, attack.triggered(clean), attack.target, splits.info, device=device,
                       precision=precision).as_dict()
        for name, clean in (("val", splits.val), ("test", splits.test))
    }
    meta = {
        "attack": attack.name,
        "attack_params": attack.params(),
        "dataset": spec.dataset,
        "arch": spec.arch,
        "split_seed": spec.seed,
        "poison_rate": rate,
        "recipe": asdict(recipe),
        "metrics": metrics,
        "train_seconds": train_s,
        "prepare_seconds": prepare_s,
        "seconds": time.perf_counter() - start,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"model": state, "attack": attack.state()}, meta


def _victim(spec: ZooSpec, info: DatasetInfo, splits: Splits, entry: Any, seconds: float, built: bool) -> Victim:
    meta = entry.meta
    attack = restore_attack(info, meta["attack_params"], entry.groups.get("attack", {}))
    return Victim(
        attack=attack.name,
        dataset=spec.dataset,
        arch=spec.arch,
        info=info,
        target=attack.target,
        state_dict=entry.groups["model"],
        attack_obj=attack,
        bd_val=attack.triggered(splits.val),
        bd_test=attack.triggered(splits.test),
        metrics={k: Metrics(**meta["metrics"][k]) for k in ("val", "test")},
        key=entry.key,
        seconds=seconds,
        built=built,
        train_seconds=float(meta.get("train_seconds", 0.0)),
        poison_rate=None if attack.name == "none" else meta.get("poison_rate"),
    )


def get_victims(
    spec: ZooSpec,
    attacks: Sequence[str] | None = None,
    *,
    splits: Splits | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[Victim]:
    """Load each attack's victim (``spec.attacks`` when None) from the store, building (and
    storing) the missing ones, on ``device`` (None: ``spec.device``).

    Validation happens first: a bad attack or poison rate raises DataError before anything is
    trained or written. Concurrent callers build each victim once (the store's lock is held
    around "get, else build and put").
    """
    if splits is None:
        splits = spec.load_splits()
    prepared = prepare_attacks(spec, attacks, splits)
    dev = pick_device(spec.device if device is None else device)
    store = _open_store(spec)
    victims = []
    for name, attack in prepared.items():
        start = time.perf_counter()
        key = store.key(victim_description(spec, attack))
        entry, built = store.get(key), False
        if entry is None:
            with store.lock(key):
                entry = store.get(key)
                if entry is None:
                    groups, meta = _build(spec, attack, splits, dev, progress)
                    entry, built = store.put(key, groups, meta), True
        victim = _victim(spec, splits.info, splits, entry, float(entry.meta["seconds"]), built)
        if not built:
            victim.seconds = time.perf_counter() - start
        victims.append(victim)
    return victims
