"""Fine-tuning backdoor defenses: one file per defense, a shared engine, an explicit registry.

Each defense module exports ``NAME``, a frozen ``Config`` dataclass (paper defaults),
``OVERRIDES`` (small per-dataset diffs, each with a one-line why) and
``run(model, clean, info, cfg, *, seed, device, precision="auto") -> Iterator[EpochResult]``,
which fine-tunes ``model`` in place and yields after each epoch. No defense imports ray or optuna.

>>> from defenses import get_defense, make_config
>>> cfg = make_config("fst", {"alpha": 0.1}, dataset="digits")
>>> cfg.alpha, cfg.batch_size, get_defense("fst").config_cls is type(cfg)
(0.1, 16, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from defenses import fe_tuning, fst, ft, ft_init, ftsam, lp, ngf, sft
from defenses._engine import (
    ConfigError,
    EpochResult,
    build_config,
    config_asdict,
    config_fields,
)

__all__ = [
    "REGISTRY",
    "ConfigError",
    "Defense",
    "EpochResult",
    "config_asdict",
    "config_fields",
    "get_defense",
    "make_config",
]

RunFn = Callable[..., Iterator[EpochResult]]


@dataclass(frozen=True)
class Defense:
    """A registered defense: its config class, entry point, docs and per-dataset overrides."""

    name: str
    config_cls: type
    run: RunFn
    doc: str
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _registry(modules: Sequence[ModuleType]) -> dict[str, Defense]:
    out: dict[str, Defense] = {}
    for mod in modules:
        if mod.NAME in out:
            raise ValueError(f"defense name {mod.NAME!r} registered twice: expected unique names")
        doc = (mod.__doc__ or "").strip()
        out[mod.NAME] = Defense(mod.NAME, mod.Config, mod.run, doc, mod.OVERRIDES)
    return out


REGISTRY: dict[str, Defense] = _registry([ft, ftsam, fst, ft_init, lp, fe_tuning, ngf, sft])


def get_defense(name: str) -> Defense:
    """The registered defense ``name``.

    >>> get_defense("ngf").config_cls().damping
    0.001
    """
    if name not in REGISTRY:
        raise ConfigError(f"unknown defense {name!r}: expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def make_config(
    name: str, params: Mapping[str, Any] | None = None, *, dataset: str | None = None
) -> Any:
    """Paper defaults of ``name``, then its ``dataset`` overrides, then ``params``.

    Unknown keys, wrong types (int is accepted for float; bool must be bool) and invalid values
    raise :class:`ConfigError` naming the key, the value and what was expected.

    >>> make_config("ft", {"lr": 1}).lr
    1.0
    """
    d = get_defense(name)
    return build_config(d.config_cls, name, d.overrides, params, dataset=dataset)
