"""Configs: one type system for every ``Config`` dataclass (the defenses', the re-tuning
attack's), in the bottom layer so every package uses the same rules.

- :func:`build_config`: paper defaults, then a dataset's override diff, then the caller's
  params; each key and value checked against the field's annotation (:func:`coerce`);
- :func:`config_types`, :func:`field_fits`: a field's type, and whether a value suits it (used
  by ``tuner.spaces`` to check a search space against the Config);
- :func:`check` and :func:`check_common`: the value checks each ``Config.__post_init__`` uses.

Types a Config field may have: ``bool``, ``int``, ``float`` (an int is accepted and converted),
``str`` and ``Literal[...]`` of strings. Anything else is refused when the config is built.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["MAX_BATCH", "MAX_EPOCHS", "MAX_STEPS", "ConfigError", "build_config", "check",
           "check_common", "coerce", "config_asdict", "config_fields", "config_types",
           "describe_type", "field_fits"]


class ConfigError(ValueError):
    """A config name, key, type or value that is not accepted (re-exported by ``defenses``)."""


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def describe_type(tp: Any) -> str:
    """``float``, ``int``, ... or ``one of 'a', 'b'`` for a Literal."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def field_fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is accepted for a field of type ``tp`` (see :func:`coerce`)."""
    if typing.get_origin(tp) is Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int subclass: never a number here
        return False
    if tp is int:
        return isinstance(value, numbers.Integral)
    if tp is float:
        return isinstance(value, numbers.Real)
    if tp is str:
        return isinstance(value, str)
    return False


def coerce(name: str, key: str, value: Any, tp: Any) -> Any:
    """``value`` as field type ``tp``; int is accepted for float, bool only for bool."""
    if not field_fits(value, tp):
        raise ConfigError(f"{name}: {key}={value!r} ({type(value).__name__}) is not valid: "
                          f"expected {describe_type(tp)}")
    if tp is int:
        return int(value)
    if tp is float:
        return float(value)
    return value


def config_types(cfg_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(cfg_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cfg_cls)}


def build_config(cfg_cls: type, name: str, overrides: Mapping[str, Mapping[str, Any]],
                 params: Mapping[str, Any] | None = None, *, dataset: str | None = None) -> Any:
    """Paper defaults, then ``overrides[dataset]``, then ``params``; keys and types checked."""
    types = config_types(cfg_cls)
    values: dict[str, Any] = {}
    layers = [overrides.get(dataset, {}) if dataset is not None else {}, params or {}]
    for layer in layers:
        for key, value in layer.items():
            if key not in types:
                raise ConfigError(f"{name}: unknown config key {key!r} (value {value!r}): "
                                  f"expected one of {', '.join(types)}")
            values[key] = coerce(name, key, value, types[key])
    return cfg_cls(**values)


def config_fields(cfg_cls: type) -> dict[str, dict[str, Any]]:
    """JSON-able description: field -> {"type", "default"[, "choices"]}."""
    out: dict[str, dict[str, Any]] = {}
    for f_name, tp in config_types(cfg_cls).items():
        default = next(f.default for f in dataclasses.fields(cfg_cls) if f.name == f_name)
        entry: dict[str, Any] = {"default": default}
        if typing.get_origin(tp) is Literal:
            entry.update(type="str", choices=list(typing.get_args(tp)))
        else:
            entry["type"] = tp.__name__
        out[f_name] = entry
    return out


def config_asdict(cfg: Any) -> dict[str, Any]:
    """A config as a plain JSON-able dict."""
    return dataclasses.asdict(cfg)


# Bounds far above any published setting, so that a typo fails in one line instead of planning
# years of work or allocating a 256 GB batch (the paper defaults are 5-100 epochs, 16-256 images).
MAX_EPOCHS = 1_000
MAX_BATCH = 8_192  # images; 8,192 x 3 x 224 x 224 fp32 is already 4.9 GB of input alone
MAX_STEPS = 100_000  # per epoch, for configs that count steps rather than passes


def check_common(cfg: Any) -> None:
    """Checks every config shares: epochs, batch size, lr-like and regularization fields."""
    check(1 <= cfg.epochs <= MAX_EPOCHS, f"epochs={cfg.epochs}: expected an integer in 1..{MAX_EPOCHS}")
    check(1 <= cfg.batch_size <= MAX_BATCH,
          f"batch_size={cfg.batch_size}: expected an integer in 1..{MAX_BATCH}")
    steps = getattr(cfg, "steps_per_epoch", 1)
    check(steps <= MAX_STEPS, f"steps_per_epoch={steps}: expected at most {MAX_STEPS}")
    for key in ("lr", "weight_decay", "momentum"):
        v = getattr(cfg, key, 0.0)
        check(v >= 0.0 and math.isfinite(v), f"{key}={v}: expected a finite number >= 0")
    momentum = getattr(cfg, "momentum", 0.0)
    check(momentum < 1.0, f"momentum={momentum}: expected a number < 1")
