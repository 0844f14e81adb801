"""Backdoor attacks: one module per attack, each with the literature's default parameters.

LF, LC and TrojanNN build their trigger from the clean model of the same dataset and arch, SSBA
trains its own encoder, Input-aware its mask generator (and then trains its pattern generator
jointly with the victim); :func:`zoo.victims.get_victims` runs that preparation once and keeps
the result in the attack's ``state()`` (see :class:`zoo.attacks.base.Attack`).

>>> from zoo.data import dataset_info
>>> make_attack("badnets", dataset_info("digits")).params()
{'name': 'badnets', 'target': 0, 'seed': 0, 'patch': 2, 'value': 255}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zoo.attacks.badnets import BadNets
from zoo.attacks.base import Attack
from zoo.attacks.blended import Blended
from zoo.attacks.bpp import BPP
from zoo.attacks.inputaware import InputAware
from zoo.attacks.lc import LC
from zoo.attacks.lf import LF
from zoo.attacks.none import NoAttack
from zoo.attacks.sig import SIG
from zoo.attacks.ssba import SSBA
from zoo.attacks.trojannn import TrojanNN
from zoo.attacks.wanet import WaNet
from zoo.data import DatasetInfo
from zoo.readers import DataError

__all__ = ["ATTACKS", "Attack", "DATASET_DEFAULTS", "DEFAULT_ATTACKS", "DEFAULT_POISON_RATE",
           "check_attack_names", "dataset_defaults", "make_attack", "restore_attack"]

DEFAULT_POISON_RATE = 0.1
# The attacks a search optimizes over unless told otherwise: one each of patch, blend, warp
# and clean-label signal triggers, all reliable on every dataset here.
DEFAULT_ATTACKS = ("badnets", "blended", "wanet", "sig")

# Where the literature's defaults (tuned for 32x32 CIFAR-10 with 5,000 images per class) do not
# carry over to a dataset, the zoo's documented defaults for it: attack parameters, plus
# ``poison_rate``, used unless the user gives --poison-rate. Each attack's module says why.
DATASET_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": {
        "sig": {"poison_rate": 0.08, "test_delta": 80.0},
        "lc": {"poison_rate": 0.08, "eps": 0.3, "at_eps": 32 / 255, "patch": 4},
        "inputaware": {"cross_ratio": 0.5},
    },
}

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "badnets": BadNets,
    "blended": Blended,
    "wanet": WaNet,
    "sig": SIG,
    "lf": LF,
    "lc": LC,
    "bpp": BPP,
    "trojannn": TrojanNN,
    "inputaware": InputAware,
    "ssba": SSBA,
}


def _lookup(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def check_attack_names(names: Sequence[str], flag: str) -> None:
    """At least one name, each a known attack, each once (``DataError`` naming ``flag``)."""
    if not names:
        raise DataError(f"{flag} is empty: expected at least one attack, e.g. badnets")
    for name in names:
        if name not in ATTACKS:
            raise DataError(f"unknown attack {name!r} in {flag}: expected any of {', '.join(ATTACKS)}")
    dup = sorted({a for a in names if list(names).count(a) > 1})
    if dup:
        raise DataError(f"{flag} names {', '.join(dup)} twice: expected each attack once")


def dataset_defaults(dataset: str, name: str) -> dict[str, Any]:
    """The zoo's defaults for attack ``name`` on ``dataset`` (a copy; may hold ``poison_rate``)."""
    return dict(DATASET_DEFAULTS.get(dataset, {}).get(name, {}))


def make_attack(name: str, info: DatasetInfo, *, target: int = 0, seed: int = 0, **params: Any) -> Attack:
    """A fresh ``name`` attack for ``info``; ``params`` override the attack's defaults."""
    cls = _lookup(name)
    try:
        return cls(info, target=target, seed=seed, **params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {sorted(params)} for attack {name!r}: {exc}") from None


def restore_attack(info: DatasetInfo, params: dict[str, Any], state: dict) -> Attack:
    """Rebuild the attack recorded by ``params()`` and ``state()``."""
    return _lookup(str(params.get("name"))).restore(info, params, state)
