"""The zoo: one backdoored victim per attack, built once and kept in the store.

A victim's store key hashes everything that determines it: dataset, split seed, arch, attack
name and ``params()`` (trigger seed and target included), poison rate (None for the clean
model, which does not depend on it), the training recipe, and the store's format version.
Each entry holds two tensor groups, ``model`` (the state_dict) and ``attack`` (the trigger's
state), and its no-defense metrics on val and test in ``meta``.

Victims trained elsewhere come in through the same ``--attacks`` list: ``bb:NAME`` (a
BackdoorBench record imported into the store, :mod:`zoo.backdoorbench`) and the names of a
``--victims`` manifest (:mod:`zoo.manifest`). They are stored under the hash of their weights,
triggered images and description (:mod:`zoo.external`); a :class:`Victim` made from one carries
its own input normalization in ``info`` and its triggered val and test sets (the given set cut
in seeded halves, the given halves, or a built-in trigger applied to val and test); its
no-defense metrics are measured once per dataset and split seed and kept in the store.

>>> from zoo.victims import ZooSpec, get_victims
>>> victims = get_victims(ZooSpec("digits"), ["badnets"])   # doctest: +SKIP
>>> victims[0].metrics["test"].asr                          # doctest: +SKIP
100.0
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
from zoo.backdoorbench import PREFIX as BB_PREFIX
from zoo.data import CLEAN_RATIOS, DATASETS, DataError, DatasetInfo, Split, Splits, load_splits
from zoo.external import (
    ExternalError,
    check_name,
    halves,
    name_key,
    named_entry,
    with_normalization,
)
from zoo.manifest import ManifestVictim, load_manifest, store_victim
from zoo.metrics import Metrics, evaluate
from zoo.models import ARCHS, Classifier, build_model, canonical_arch
from zoo.runtime import (
    PRECISIONS,
    JobMap,
    Precision,
    SerialMap,
    pick_device,
    prepare_model,
    reproducible_precision,
    stored_work_threads,
)
from zoo.store import Entry, Store
from zoo.train import Recipe, default_recipe, train_victim

__all__ = ["Victim", "ZooSpec", "build_victim", "check_victim_names", "check_zoo_dir", "get_victims", "prepare_attacks",
           "victim_description"]


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
        "comma-separated victims: a built-in attack each ('none' is the clean model), "
        f"{BB_PREFIX}NAME for a BackdoorBench record imported with 'python -m tuner "
        "import-backdoorbench', or a name from --victims",
        default_text=",".join(DEFAULT_ATTACKS) + "; with --victims, that file's victims",
        choices=tuple(ATTACKS), smoke=("badnets",)))
    manifest: Path | None = field(default=None, compare=False, metadata=_opt(
        "YAML manifest of victims trained elsewhere (weights, arch, classes, target, triggered "
        "test set; format in zoo/manifest.py); 'python -m tuner zoo --export DIR' writes one",
        flag="--victims", metavar="FILE.yaml"))
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
        for name in ("data_root", "zoo_dir", "blend_image", "manifest"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, Path(value).expanduser().absolute())
        set_(self, "attacks", tuple(self.attacks))
        if self.dataset not in DATASETS:
            raise DataError(f"unknown dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}")
        if self.arch not in ARCHS:
            raise DataError(f"unknown model {self.arch!r}: expected one of {', '.join(ARCHS)}")
        # One spelling per model, so BackdoorBench's name and ours share victims and recipes.
        set_(self, "arch", canonical_arch(self.arch))
        check_victim_names(self.attacks, "--attacks", manifest=self.manifest is not None)
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

    def victim_precision(self, device: torch.device) -> Precision:
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
    """One trained victim with its trigger and its no-defense metrics (plain, picklable).

    ``attack`` is the victim's name in ``--attacks`` and in every report: a built-in attack,
    ``bb:NAME`` or a manifest's name. Victims trained elsewhere (``source`` "backdoorbench"
    or "manifest") carry their own input normalization in ``info``, their triggered val and
    test sets in ``bd_val``/``bd_test`` and no ``attack_obj`` unless their trigger is a
    built-in one; their ``poison_rate`` is unknown (None).
    """

    attack: str
    dataset: str
    arch: str
    info: DatasetInfo
    target: int
    state_dict: dict[str, torch.Tensor]
    attack_obj: Attack | None
    bd_val: Split
    bd_test: Split
    metrics: dict[str, Metrics]
    key: str
    seconds: float  # build time (training + evaluation) if built, load time if loaded
    built: bool
    train_seconds: float = 0.0  # training time recorded when the victim was built
    poison_rate: float | None = None  # None for the clean model and external victims
    source: str = "zoo"  # "zoo" (built here), "backdoorbench" or "manifest"

    @property
    def retunable(self) -> bool:
        """Whether the re-tuning attack (:mod:`zoo.sequela`) can run on it: that needs the
        attacker's trigger on training images, which victims trained elsewhere (a triggered test
        set only) and the clean model do not have."""
        return self.attack_obj is not None and self.poison_rate is not None

    def model(self, device: torch.device | str = "cpu") -> Classifier:
        """A fresh model with the victim's weights, on ``device`` (left in train mode)."""
        model = build_model(self.arch, self.info)
        model.load_state_dict(self.state_dict)
        return prepare_model(model, torch.device(device))


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be wrong is caught before anything is trained or written.
# ---------------------------------------------------------------------------------------------


def check_victim_names(names: Sequence[str], flag: str, *, manifest: bool) -> None:
    """At least one name, each once; each a built-in attack, ``bb:NAME``, or (with a
    manifest) a victim name, whose presence in the manifest is checked when it is read."""
    builtin = [n for n in names if n in ATTACKS]
    if builtin or not names:
        check_attack_names(builtin or names, flag)
    for name in names:
        if name in ATTACKS:
            continue
        if name.startswith(BB_PREFIX):
            check_name(name[len(BB_PREFIX):], f"{flag}: {name!r}: the NAME of {BB_PREFIX}NAME")
        elif not manifest:
            raise DataError(f"unknown attack {name!r} in {flag}: expected any of "
                            f"{', '.join(ATTACKS)}, {BB_PREFIX}NAME (an imported BackdoorBench "
                            "record) or a victim of --victims FILE")
        else:
            check_name(name, f"{flag}: victim name")
    dup = sorted({a for a in names if list(names).count(a) > 1})
    if dup:
        raise DataError(f"{flag} names {', '.join(dup)} twice: expected each victim once")


def prepare_attacks(spec: ZooSpec, attacks: Sequence[str] | None, splits: Splits
                    ) -> dict[str, Attack]:
    """Build each built-in attack (``spec.attacks`` when None), checking its poison rate
    against the data, and check the victims trained elsewhere (``bb:NAME`` is in the store,
    manifest victims are in ``--victims``, each for this data).

    Raises DataError (one line, naming the bad value) before any training happens.
    """
    return _prepare_all(spec, attacks, splits)[0]


def _prepare_all(spec: ZooSpec, attacks: Sequence[str] | None, splits: Splits
                 ) -> tuple[dict[str, Attack], dict[str, dict[str, Any] | ManifestVictim]]:
    """(built-in attacks, external victims' sources by name): see :func:`prepare_attacks`."""
    attacks = spec.attacks if attacks is None else tuple(attacks)
    check_victim_names(attacks, "attacks", manifest=spec.manifest is not None)
    external = _external_sources(spec, attacks, splits.info)
    out: dict[str, Attack] = {}
    for name in dict.fromkeys(a for a in attacks if a in ATTACKS):
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
    return out, external


def _external_sources(spec: ZooSpec, attacks: Sequence[str], data: DatasetInfo
                      ) -> dict[str, dict[str, Any] | ManifestVictim]:
    """Each external victim's source: a ``bb:NAME`` pointer's meta (no tensors read) or its
    manifest entry; DataError when one is missing or was made for other data."""
    out: dict[str, dict[str, Any] | ManifestVictim] = {}
    manifest = {v.name: v for v in load_manifest(spec.manifest)} if spec.manifest else {}
    store = _open_store(spec)
    for name in attacks:
        if name in ATTACKS:
            continue
        if not name.startswith(BB_PREFIX):
            if name not in manifest:
                raise DataError(f"--attacks {name!r}: not a built-in attack and not a victim of "
                                f"{spec.manifest}: expected one of {', '.join(manifest)}")
            out[name] = manifest[name]
            continue
        pointer = named_entry(store, name)
        if pointer is None:
            raise DataError(f"{name} is not in the victim store {store.root}: expected "
                            f"'python -m tuner import-backdoorbench RECORD_DIR --name "
                            f"{name[len(BB_PREFIX):]}' first (with the same --zoo-dir)")
        _check_data(name, pointer, data)
        out[name] = pointer
    return out


def _check_data(name: str, meta: dict[str, Any], data: DatasetInfo) -> None:
    """An external victim's images and classes are the data's (and its dataset, if named)."""
    theirs = (meta.get("dataset"), meta.get("channels"), meta.get("size"), meta.get("num_classes"))
    ours = (data.name, data.channels, data.size, data.num_classes)
    if theirs != ours:
        raise DataError(f"{name} was trained on {theirs[0]} ({theirs[1]}x{theirs[2]}x{theirs[2]} "
                        f"images, {theirs[3]} classes): expected --dataset {theirs[0]} (this run "
                        f"has {ours[0]}: {ours[1]}x{ours[2]}x{ours[2]}, {ours[3]} classes)")


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


def check_zoo_dir(spec: ZooSpec) -> None:
    """The victim store (or its nearest existing parent) must be a folder this process can write
    in: victims are built into it, and every load takes a lock file there. Raises DataError
    before anything is built or started."""
    root = _open_store(spec).root
    probe = root
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(f"--zoo-dir {str(root)!r}: {str(probe)!r} is not a folder: expected a "
                        "folder for the victim store")
    try:  # try for real: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise DataError(f"--zoo-dir {str(root)!r}: cannot write in {str(probe)!r} "
                        f"({exc.strerror or exc}): expected a writable folder (the store "
                        "keeps a lock file per victim)") from None


def _clean_key(spec: ZooSpec, info: DatasetInfo) -> str:
    """Store key of the clean (``none``) victim of ``spec``: what model-dependent triggers come from."""
    return Store.key(victim_description(spec, make_attack("none", info, seed=spec.training_seed)))


def _prepare(attack: Attack, splits: Splits, device: torch.device, progress: bool,
             clean_model: Callable[[], Classifier] | None) -> float:
    """Run ``attack.prepare`` (with a loader of the clean model when it needs one); returns seconds."""
    if not attack.needs_preparation:
        return 0.0
    start = time.perf_counter()
    attack.prepare(splits, clean_model if attack.needs_clean_model else None, device, progress)
    return time.perf_counter() - start


def build_victim(spec: ZooSpec, attack: Attack, *, splits: Splits, device: torch.device,
                 clean: dict[str, torch.Tensor] | None = None, progress: bool = False
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Train one victim on ``device``: its tensor groups and meta, what the store keeps. A job
    of :func:`get_victims` (here or in a Ray task); ``clean`` is the clean model's weights, for
    an attack whose trigger derives from it. On the CPU with ``BUILD_THREADS`` torch threads,
    whoever runs it (:func:`zoo.runtime.stored_work_threads`): one key, one set of weights."""
    with stored_work_threads(device):
        return _build(spec, attack, splits=splits, device=device, clean=clean, progress=progress)


def _build(spec: ZooSpec, attack: Attack, *, splits: Splits, device: torch.device,
           clean: dict[str, torch.Tensor] | None, progress: bool
           ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    def clean_model() -> Classifier:
        if clean is None:
            raise ValueError(f"{attack.name}: needs the clean model's weights")
        model = build_model(spec.arch, splits.info)
        model.load_state_dict(clean)
        return prepare_model(model, device)

    start = time.perf_counter()
    prepare_s = _prepare(attack, splits, device, progress, clean_model)
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
        name: evaluate(model, part, attack.triggered(part), attack.target, splits.info, device=device,
                       precision=precision).as_dict()
        for name, part in (("val", splits.val), ("test", splits.test))
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
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "train_seconds": train_s,
        "prepare_seconds": prepare_s,
        "seconds": time.perf_counter() - start,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"model": state, "attack": attack.state()}, meta


class _Forged(Exception):
    """A built victim's entry whose checksums hold but whose content is not what its key says."""


_METRICS = ("acc", "asr", "ra")


def _verified(store: Store, entry_key: str, info: DatasetInfo) -> Entry | None:
    """``store.get`` plus what the checksums cannot promise: the checksums catch accidents
    (a flipped byte, a truncated file), not someone who can write the store and recompute them.
    So the entry's own description must hash to its key (an edited target, attack or recipe
    changes the key), its tensors must have the architecture's names, shapes and dtypes, its
    trigger must restore, and its metrics must be percentages. Anything else is reported as
    corrupt, removed and rebuilt, as a bad checksum is. Forged metrics that are still valid
    percentages cannot be told from real ones without re-measuring them."""
    entry = store.get(entry_key)
    if entry is None:
        return None
    try:
        _check_entry(entry, info)
    except _Forged as exc:
        print(f"zoo store: entry {entry_key} is corrupt ({exc}); rebuilding", file=sys.stderr)
        store.remove(entry_key)
        return None
    return entry


def _check_entry(entry: Entry, info: DatasetInfo) -> None:
    meta = entry.meta
    fields = {"attack": str, "attack_params": dict, "dataset": str, "arch": str,
              "split_seed": int, "recipe": dict, "metrics": dict}
    for name, tp in fields.items():
        if not isinstance(meta.get(name), tp) or isinstance(meta.get(name), bool):
            raise _Forged(f"meta.json field {name!r} is missing or not a {tp.__name__}")
    attack = meta["attack"]
    description = {"kind": "victim", "dataset": meta["dataset"], "split_seed": meta["split_seed"],
                   "arch": meta["arch"], "attack": attack, "attack_params": meta["attack_params"],
                   "poison_rate": None if attack == "none" else meta.get("poison_rate"),
                   "recipe": meta["recipe"]}
    try:
        derived = Store.key(description)
    except ValueError:
        derived = None
    if derived != entry.key:
        raise _Forged("meta.json does not describe the entry's key (edited)")
    for split in ("val", "test"):
        m = meta["metrics"].get(split)
        if not isinstance(m, dict) or set(m) != set(_METRICS) or not all(
                isinstance(m[k], (int, float)) and not isinstance(m[k], bool)
                and math.isfinite(m[k]) and 0.0 <= m[k] <= 100.0 for k in _METRICS):
            raise _Forged(f"{split} metrics are not three percentages")
    for name in ("seconds", "train_seconds"):
        v = meta.get(name, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1e9:
            raise _Forged(f"meta.json field {name!r} is not a number of seconds")
    if set(entry.groups) != {"model", "attack"}:
        raise _Forged(f"tensor groups {sorted(entry.groups)}: expected attack and model")
    with torch.device("meta"):  # names, shapes and dtypes only: no memory, no init
        expected = build_model(meta["arch"], info).state_dict()
    got = entry.groups["model"]
    if set(got) != set(expected) or any(
            got[k].shape != v.shape or got[k].dtype != v.dtype for k, v in expected.items()):
        raise _Forged(f"model tensors do not fit a {meta['arch']} on {info.name}")
    try:
        restored = restore_attack(info, meta["attack_params"], entry.groups["attack"])
    except Exception as exc:  # whatever a forged state makes the attack's own code raise
        raise _Forged(f"the trigger does not restore: {str(exc)[:80]}") from None
    if restored.name != attack:
        raise _Forged(f"the trigger is {restored.name!r}, the entry says {attack!r}")


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
    jobs: JobMap | None = None,
) -> list[Victim]:
    """Load each attack's victim (``spec.attacks`` when None) from the store, building (and
    storing) the missing ones with ``jobs`` (``tuner.trainable.RayMap``: in parallel, as Ray
    tasks; None: one after another here, on ``device``, None meaning ``spec.device``).

    Validation happens first: a bad attack or poison rate raises DataError before anything is
    trained or written. Concurrent callers build each victim once (the store's locks are held
    around "get, else build and put").
    """
    if splits is None:
        splits = spec.load_splits()
    prepared, external = _prepare_all(spec, attacks, splits)
    dev = pick_device(spec.device if device is None else device)
    store = _open_store(spec)
    names = list(dict.fromkeys(spec.attacks if attacks is None else attacks))
    keys = {n: store.key(victim_description(spec, prepared[n])) for n in names if n not in external}
    start = time.perf_counter()
    entries = {n: _verified(store, k, splits.info) for n, k in keys.items()}
    loaded_s = (time.perf_counter() - start) / max(1, len(keys))
    missing = [n for n in keys if entries[n] is None]
    built = _build_missing(spec, missing, prepared, keys, entries, splits, store, dev, progress,
                           jobs) if missing else set()
    victims = []
    for name in names:
        if name in external:
            victims.append(_external_victim(spec, name, external[name], splits, store, dev))
            continue
        start = time.perf_counter()
        entry = entries[name]
        assert entry is not None
        victim = _victim(spec, splits.info, splits, entry, float(entry.meta["seconds"]),
                         name in built)
        if name not in built:
            victim.seconds = loaded_s + time.perf_counter() - start
        victims.append(victim)
    return victims


def _build_missing(spec: ZooSpec, missing: list[str], prepared: dict[str, Attack],
                   keys: dict[str, str], entries: dict[str, Entry | None], splits: Splits,
                   store: Store, device: torch.device, progress: bool, jobs: JobMap | None
                   ) -> set[str]:
    """Build the ``missing`` victims (``jobs``, or here one after another) and store them;
    fills ``entries``; returns the names this call built. The clean model comes first when an
    attack's trigger derives from it."""
    clean = None
    if any(prepared[n].needs_clean_model for n in missing):
        (c,) = get_victims(spec, ["none"], splits=splits, device=device, progress=progress,
                           jobs=jobs)
        clean = c.state_dict
    built: set[str] = set()
    with contextlib.ExitStack() as locks:
        for name in sorted(missing, key=keys.__getitem__):  # one order: no deadlock
            locks.enter_context(store.lock(keys[name]))
        for name in missing:  # another process may have built some meanwhile ("none": we did)
            entries[name] = _verified(store, keys[name], splits.info)
        todo = [n for n in missing if entries[n] is None]
        runner = jobs or SerialMap(device)
        for i, (groups, meta) in runner(build_victim, [(spec, prepared[n]) for n in todo],
                                        splits=splits, clean=clean,
                                        progress=progress and jobs is None):
            entries[todo[i]] = store.put(keys[todo[i]], groups, meta)
            built.add(todo[i])
            if progress and jobs is not None:
                print(f"  victim {todo[i]} built in {meta['seconds']:.0f}s "
                      f"({len(built)}/{len(todo)})", file=sys.stderr, flush=True)
    return built


# ---------------------------------------------------------------------------------------------
# Victims trained elsewhere (zoo.backdoorbench, zoo.manifest; layout in zoo.external)
# ---------------------------------------------------------------------------------------------


def _external_victim(spec: ZooSpec, name: str, source: dict[str, Any] | ManifestVictim,
                     splits: Splits, store: Store, device: torch.device) -> Victim:
    """Load (a manifest's: read, then keep) an external victim; triggered halves and
    no-defense metrics for this split seed."""
    start = time.perf_counter()
    if isinstance(source, ManifestVictim):
        entry, kind = store_victim(source, store, splits.info), "manifest"
    else:
        found = store.get(str(source["victim"]))
        if found is None:
            store.remove(name_key(name))
            raise DataError(f"{name}: its store entry is gone (corrupt or removed): expected "
                            "'python -m tuner import-backdoorbench RECORD_DIR' again")
        entry, kind = found, "backdoorbench"
    meta = entry.meta
    _check_data(name, meta, splits.info)
    try:
        info = with_normalization(splits.info, meta["mean"], meta["std"], where=name)
    except ExternalError as exc:
        raise DataError(str(exc)) from None
    attack_obj, bd_val, bd_test = _external_triggered(spec, entry, info, splits)
    victim = Victim(
        attack=name, dataset=spec.dataset, arch=str(meta["arch"]), info=info,
        target=int(meta["target"]), state_dict=entry.groups["model"], attack_obj=attack_obj,
        bd_val=bd_val, bd_test=bd_test, metrics={}, key=entry.key, seconds=0.0, built=False,
        source=kind)
    victim.metrics = _external_metrics(spec, store, victim, splits, device)
    victim.seconds = time.perf_counter() - start
    return victim


def _external_triggered(spec: ZooSpec, entry: Entry, info: DatasetInfo, splits: Splits
                        ) -> tuple[Attack | None, Split, Split]:
    """(built-in trigger or None, triggered val, triggered test): the given set cut into
    halves with the split seed, the given halves, or the built-in trigger on val and test."""
    g, kind = entry.groups, entry.meta["triggered"]
    if kind == "split":
        val, test = halves(Split(g["triggered"]["x"], g["triggered"]["y"]), spec.seed)
        return None, val, test
    if kind == "halves":
        return (None, Split(g["triggered_val"]["x"], g["triggered_val"]["y"]),
                Split(g["triggered_test"]["x"], g["triggered_test"]["y"]))
    attack = restore_attack(info, entry.meta["attack_params"], g.get("attack", {}))
    return attack, attack.triggered(splits.val), attack.triggered(splits.test)


def _external_metrics(spec: ZooSpec, store: Store, victim: Victim, splits: Splits,
                      device: torch.device) -> dict[str, Metrics]:
    """No-defense metrics on val and test, measured once per victim, dataset and split seed
    (kept in a tensor-less store entry), as a built victim's are when it is built."""
    key = store.key({"kind": "external-metrics", "victim": victim.key, "dataset": spec.dataset,
                     "split_seed": spec.seed})
    entry = store.get(key)
    if entry is None:
        model = victim.model(device)
        precision = reproducible_precision(device, spec.precision)
        metrics = {
            name: evaluate(model, clean, bd, victim.target, victim.info, device=device,
                           precision=precision).as_dict()
            for name, clean, bd in (("val", splits.val, victim.bd_val),
                                    ("test", splits.test, victim.bd_test))}
        entry = store.put(key, {}, {"metrics": metrics, "victim": victim.key})
    return {k: Metrics(**entry.meta["metrics"][k]) for k in ("val", "test")}
