"""Fine-tuning backdoor defenses: one file per defense, a shared engine, an explicit registry.

Each defense module exports ``NAME``, a frozen ``Config`` dataclass (paper defaults),
``OVERRIDES`` (small per-dataset diffs, each with a one-line why) and
``run(model, clean, info, cfg, *, seed, device, precision="auto") -> Iterator[EpochResult]``,
which fine-tunes ``model`` in place and yields after each epoch. FST's baselines (``ft_init``,
``lp``, ``fe_tuning``) are modes of ``fst.py``'s loop, registered here under their own names.
No defense imports ray or optuna.

>>> from defenses import get_defense, make_config
>>> cfg = make_config("fst", {"alpha": 0.1}, dataset="digits")
>>> cfg.alpha, cfg.batch_size, get_defense("fst").config_cls is type(cfg)
(0.1, 16, True)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from defenses import fst, ft, ftsam, ngf, sft
from defenses._engine import EpochResult
from zoo.config import ConfigError, build_config, config_asdict, config_fields

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

    @property
    def summary(self) -> str:
        """The first line of the defense's docs."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name


def _registry(defenses: list[Defense]) -> dict[str, Defense]:
    out: dict[str, Defense] = {}
    for d in defenses:
        if d.name in out:
            raise ValueError(f"defense name {d.name!r} registered twice: expected unique names")
        out[d.name] = d
    return out


def _module(mod: Any) -> Defense:
    return Defense(mod.NAME, mod.Config, mod.run, (mod.__doc__ or "").strip(), mod.OVERRIDES)


def _fst_mode(name: str) -> Defense:
    mode = fst.MODES[name]
    return Defense(name, fst.BaselineConfig, functools.partial(fst.run_mode, mode), mode.doc,
                   fst.BASELINE_OVERRIDES)


REGISTRY: dict[str, Defense] = _registry([
    _module(ft), _module(ftsam), _module(fst), _fst_mode("ft_init"), _fst_mode("lp"),
    _fst_mode("fe_tuning"), _module(ngf), _module(sft),
])


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
