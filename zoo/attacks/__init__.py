"""Backdoor attacks: one module per attack, each with the literature's default parameters.

>>> from zoo.data import dataset_info
>>> make_attack("badnets", dataset_info("digits")).params()
{'name': 'badnets', 'target': 0, 'seed': 0, 'patch': 2, 'value': 255}
"""

from __future__ import annotations

from typing import Any

from zoo.attacks.badnets import BadNets
from zoo.attacks.base import Attack
from zoo.attacks.blended import Blended
from zoo.attacks.none import NoAttack
from zoo.attacks.sig import SIG
from zoo.attacks.wanet import WaNet
from zoo.data import DatasetInfo

__all__ = ["ATTACKS", "Attack", "make_attack", "restore_attack"]

ATTACKS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "badnets": BadNets,
    "blended": Blended,
    "wanet": WaNet,
    "sig": SIG,
}


def _lookup(name: str) -> type[Attack]:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}: expected one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


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
