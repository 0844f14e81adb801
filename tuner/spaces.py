"""Declarative search spaces: ``search_spaces/<defense>.yaml`` -> Optuna distributions.

File format (one file per defense; keys are fields of the defense's ``Config``)::

    defense: ngf                       # must match the defense the file is loaded for
    params:                            # name -> distribution
      lr:       {type: float, low: 1.0e-3, high: 5.0e-2, log: true}
      epochs:   {type: int, low: 3, high: 10}            # optional: step (int), log
      adaptive: {type: categorical, choices: [true, false]}
    default: {lr: 0.01}                # optional; see "default point" below
    constraints: ["lr_base < lr_max2"] # optional strict orderings between float/int params

- ``float`` and ``int`` ranges are built by Optuna's own ``FloatDistribution`` and
  ``IntDistribution`` (which check ``low <= high``, ``log`` with ``low > 0``, ``step``); this
  module also refuses a one-point range (leave the key out and let the Config default hold).
  ``categorical`` takes a non-empty list of distinct ``choices``. ``1e-3`` reads as a number.
- Every value must suit the Config field's type (``defenses._config.field_fits``, the rule
  ``make_config`` applies): a float field takes float or int ranges or numeric choices; an int
  field int ranges or integer choices; bool and str/Literal fields only categorical choices.
- **Default point.** ``Space.default`` holds a value for every searched param: the file's
  ``default`` entry where it gives one (inside the range / among the choices), otherwise the
  value of ``make_config(defense, dataset=dataset)`` -- the paper default with the dataset's
  documented overrides. It may lie outside a range narrowed for speed; it is still evaluated.
- **Constraints.** SFT needs ``lr_base < lr_max2 < lr_max1``. The shipped file gives the three
  rates disjoint ranges, so every sample satisfies the order by construction; ``constraints``
  states the order and the loader checks that the ranges (and explicit defaults) guarantee it.
- **Limits.** A space file is a small regular file (at most 64 KiB; not a FIFO or a device),
  without YAML aliases, nested at most 8 deep, with no key given twice; error messages show at
  most 80 characters of a value.

Errors are :class:`SpaceError` (a :class:`tuner.errors.UsageError`): one line naming the file,
the key and the problem.

>>> space = load_space("ngf")          # doctest: +SKIP
>>> sorted(space.distributions)        # doctest: +SKIP
['damping', 'epochs', 'kl_clip', 'lr', 'stat_decay']
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

from defenses import ConfigError, get_defense, make_config
from tuner._io import clip, clip_text
from tuner.errors import UsageError
from zoo.config import config_types, describe_type, field_fits
from zoo.yamlsafe import strict_loader

__all__ = ["Space", "SpaceError", "load_space", "space_from_json", "space_to_json",
           "shipped_spaces"]

TOP_KEYS = ("defense", "params", "default", "constraints")
TYPES = ("float", "int", "categorical")
_KEYS = {"float": {"type", "low", "high", "log"},
         "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}
MAX_BYTES = 64 << 10
MAX_DEPTH = 8


def _key(key: Any) -> str:
    """A key as it reads in a message, at most 40 characters."""
    text = " ".join(str(key).split())
    return text if len(text) <= 40 else text[:37] + "..."


class SpaceError(UsageError):
    """A search-space file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Space:
    """A validated search space: Optuna distributions keyed by Config field, plus the default."""

    name: str
    path: str
    distributions: dict[str, BaseDistribution]
    default: dict[str, Any]
    constraints: tuple[tuple[str, str], ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


# SafeLoader for space files: ``1e-3`` is a float (as in JSON); no aliases, no duplicate keys,
# at most ``MAX_DEPTH`` levels (a small file cannot expand into a huge value).
_Loader = strict_loader("a space file", MAX_DEPTH)


def shipped_spaces() -> list[str]:
    """Names of the defenses with a shipped ``search_spaces/<name>.yaml``."""
    root = importlib.resources.files("search_spaces")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_text(defense: str, path: str | Path | None) -> tuple[str, str]:
    if path is not None:
        p = Path(path)
        try:
            st = os.stat(p)
            if not stat.S_ISREG(st.st_mode):
                raise SpaceError(f"{p}: not a regular file: expected a YAML file")
            if st.st_size > MAX_BYTES:
                raise SpaceError(f"{p}: {st.st_size} bytes: expected a space file of at most "
                                 f"{MAX_BYTES} bytes")
            with open(p, "rb") as fh:
                return str(p), fh.read(MAX_BYTES + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(f"{p}: cannot read the search space file ({exc.__class__.__name__}: "
                             f"{clip_text(exc, 100)}): expected a readable YAML file") from None
    res = importlib.resources.files("search_spaces") / f"{defense}.yaml"
    if not res.is_file():
        raise SpaceError(f"search_spaces/{defense}.yaml: no shipped search space for defense "
                         f"{defense!r}: expected one of {', '.join(shipped_spaces())} or --space FILE")
    return f"search_spaces/{defense}.yaml", res.read_text(encoding="utf-8")


def _parse(where: str, text: str) -> dict[str, Any]:
    try:
        doc = yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise SpaceError(f"{where}: invalid YAML{at}: {clip_text(problem, 100)}") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}, "
                         f"got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in TOP_KEYS)
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key {clip(unknown[0], 40)}: expected "
                         f"{', '.join(TOP_KEYS)}")
    return doc


# ---------------------------------------------------------------------------------------------
# One parameter
# ---------------------------------------------------------------------------------------------


def _number(where: str, name: str, key: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        want = "an integer" if integer else "a number"
        raise SpaceError(f"{where}: params.{name}.{key} = {clip(value)}: expected {want}")
    if not math.isfinite(value):
        raise SpaceError(f"{where}: params.{name}.{key} = {clip(value)}: expected a finite number")
    return value


def _range(where: str, name: str, spec: dict[str, Any], kind: str, tp: Any) -> BaseDistribution:
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{where}: params.{name}: missing {key!r} for type {kind}")
    integer = kind == "int"
    low = _number(where, name, "low", spec["low"], integer)
    high = _number(where, name, "high", spec["high"], integer)
    sample = int(low) if integer else float(low)
    if not field_fits(sample, tp) or isinstance(sample, bool):
        raise SpaceError(f"{where}: params.{name}: type {kind} does not suit the Config field "
                         f"type {describe_type(tp)}")
    log, step = spec.get("log", False), spec.get("step", 1 if integer else None)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: params.{name}.log = {clip(log)}: expected true or false")
    if isinstance(step, bool) or (step is not None and not isinstance(step, int)):
        raise SpaceError(f"{where}: params.{name}.step = {clip(step)}: expected an integer")
    if low >= high:
        raise SpaceError(f"{where}: params.{name}: empty range low={low!r} >= high={high!r}: "
                         f"expected low < high")
    try:  # Optuna's constructors check log, step and divisibility
        if integer:
            return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        return FloatDistribution(float(low), float(high), log=log)
    except ValueError as exc:
        raise SpaceError(f"{where}: params.{name}: {clip_text(exc, 160)}") from None


def _categorical(where: str, name: str, spec: dict[str, Any], tp: Any) -> BaseDistribution:
    if "choices" not in spec:
        raise SpaceError(f"{where}: params.{name}: missing 'choices' for type categorical")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: params.{name}.choices = {clip(choices)}: expected a "
                         "non-empty list")
    for c in choices:
        if isinstance(c, float) and not math.isfinite(c):
            raise SpaceError(f"{where}: params.{name}.choices: {clip(c)} is not finite")
        if not field_fits(c, tp):
            raise SpaceError(f"{where}: params.{name}.choices: {clip(c)} does not suit the Config "
                             f"field type {describe_type(tp)}")
    if len({(type(c), c) for c in choices}) != len(choices):
        raise SpaceError(f"{where}: params.{name}.choices = {clip(choices)}: duplicate choices")
    return CategoricalDistribution(choices)


def _distribution(where: str, name: str, spec: Any, tp: Any) -> BaseDistribution:
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: params.{name}: expected a mapping such as "
                         f"{{type: float, low: 0.001, high: 0.1, log: true}}, got {clip(spec)}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}: params.{name}.type = {clip(kind)}: expected one of "
                         f"{', '.join(TYPES)}")
    extra = sorted(str(k) for k in spec if k not in _KEYS[kind])
    if extra:
        raise SpaceError(f"{where}: params.{name}: unknown key {clip(extra[0], 40)} for type "
                         f"{kind}: expected {', '.join(sorted(_KEYS[kind]))}")
    if kind == "categorical":
        return _categorical(where, name, spec, tp)
    return _range(where, name, spec, kind, tp)


# ---------------------------------------------------------------------------------------------
# Default point and constraints
# ---------------------------------------------------------------------------------------------


def _inside(value: Any, dist: BaseDistribution) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return any(type(value) is type(c) and value == c for c in dist.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and not float(value).is_integer():
        return False
    return dist.low <= value <= dist.high  # type: ignore[attr-defined]


def _defaults(where: str, doc: dict[str, Any], dists: dict[str, BaseDistribution],
              types: dict[str, Any], defense: str, dataset: str | None) -> dict[str, Any]:
    given = doc.get("default") or {}
    if not isinstance(given, dict):
        raise SpaceError(f"{where}: default: expected a mapping param -> value, got {clip(given)}")
    for name, value in given.items():
        if name not in dists:
            raise SpaceError(f"{where}: default.{_key(name)}: not a searched param: expected "
                             f"one of {', '.join(dists)}")
        if not _inside(value, dists[name]):
            raise SpaceError(f"{where}: default.{name} = {clip(value)} is outside its "
                             f"distribution {_describe(dists[name])}")
        if not field_fits(value, types[name]):
            raise SpaceError(f"{where}: default.{name} = {clip(value)} does not suit the Config "
                             f"field type {describe_type(types[name])}")
    base = dataclasses.asdict(make_config(defense, dataset=dataset))
    return {name: given[name] if name in given else base[name] for name in dists}


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    scale = ", log" if dist.log else ""  # type: ignore[attr-defined]
    return f"[{dist.low}, {dist.high}{scale}]"  # type: ignore[attr-defined]


_ORDER = re.compile(r"^\s*(\w+)\s*<\s*(\w+)\s*$")


def _constraints(where: str, doc: dict[str, Any], dists: dict[str, BaseDistribution],
                 default: dict[str, Any], explicit: set[str]) -> tuple[tuple[str, str], ...]:
    raw = doc.get("constraints") or []
    if not isinstance(raw, list):
        raise SpaceError(f"{where}: constraints: expected a list such as ['a < b'], got {clip(raw)}")
    out = []
    for text in raw:
        m = _ORDER.match(text) if isinstance(text, str) else None
        if m is None:
            raise SpaceError(f"{where}: constraints: {clip(text)}: expected 'param_a < param_b'")
        a, b = m.groups()
        for n in (a, b):
            if n not in dists or isinstance(dists[n], CategoricalDistribution):
                raise SpaceError(f"{where}: constraints: {clip(text)}: {n!r} is not a searched "
                                 f"float/int param")
        high_a, low_b = dists[a].high, dists[b].low  # type: ignore[attr-defined]
        if not high_a < low_b:
            raise SpaceError(f"{where}: constraints: {clip(text)}: ranges overlap (high of {a} "
                             f"{high_a} >= low of {b} {low_b}): expected disjoint ranges so "
                             "every sample satisfies it")
        if {a, b} <= explicit and not default[a] < default[b]:
            raise SpaceError(f"{where}: default: {a}={default[a]!r} < {b}={default[b]!r} is "
                             f"violated (constraint {clip(text)})")
        out.append((a, b))
    return tuple(out)


def _check_values(where: str, defense: str, dists: dict[str, BaseDistribution],
                  default: dict[str, Any], dataset: str | None) -> None:
    """The Config accepts both corners of the space, every choice, and the default point."""
    def corner(end: int) -> dict[str, Any]:
        return {n: d.choices[end] if isinstance(d, CategoricalDistribution) else
                (d.low if end == 0 else d.high)  # type: ignore[attr-defined]
                for n, d in dists.items()}

    low = corner(0)
    points = [("lower corner", low), ("upper corner", corner(-1)), ("default", default)]
    for name, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            points += [(f"choice {name}={c!r}", {**low, name: c}) for c in d.choices[1:-1]]
    for label, point in points:
        try:
            make_config(defense, point, dataset=dataset)
        except ConfigError as exc:
            raise SpaceError(f"{where}: params: the {defense} Config rejects the space's {label} "
                             f"{clip(point, 200)}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_space(defense: str, path: str | Path | None = None, *, dataset: str | None = None) -> Space:
    """Load and validate the search space of ``defense``.

    ``path=None`` reads the shipped ``search_spaces/<defense>.yaml``; ``dataset`` picks the
    dataset overrides used to fill the default point (see the module docstring).
    """
    where, text = _read_text(defense, path)
    doc = _parse(where, text)
    if doc.get("defense") != defense:
        raise SpaceError(f"{where}: defense = {clip(doc.get('defense'), 40)}: expected "
                         f"{defense!r} (the defense this space is loaded for)")
    params = doc.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{where}: params: expected a non-empty mapping name -> distribution")
    try:
        types = config_types(get_defense(defense).config_cls)
    except ConfigError as exc:
        raise SpaceError(f"unknown defense {defense!r}: {exc}") from None
    dists: dict[str, BaseDistribution] = {}
    for name, spec in params.items():
        if name not in types:
            raise SpaceError(f"{where}: params.{_key(name)}: not a field of the {defense} "
                             f"Config: expected one of {', '.join(types)}")
        dists[name] = _distribution(where, name, spec, types[name])
    default = _defaults(where, doc, dists, types, defense, dataset)
    explicit = set(doc.get("default") or {})
    constraints = _constraints(where, doc, dists, default, explicit)
    _check_values(where, defense, dists, default, dataset)
    return Space(defense, where, dists, default, constraints)


def space_to_json(space: Space) -> dict[str, Any]:
    """JSON-able form (distributions through Optuna's ``distribution_to_json``)."""
    return {
        "defense": space.name,
        "path": space.path,
        "params": {k: json.loads(distribution_to_json(d)) for k, d in space.distributions.items()},
        "default": dict(space.default),
        "constraints": [f"{a} < {b}" for a, b in space.constraints],
    }


def space_from_json(data: dict[str, Any]) -> Space:
    """Inverse of :func:`space_to_json` (used by the report to rebuild a study)."""
    dists = {str(k): json_to_distribution(json.dumps(v)) for k, v in data.get("params", {}).items()}
    pairs = tuple((a.strip(), b.strip()) for a, _, b in
                  (str(c).partition("<") for c in data.get("constraints", [])))
    return Space(str(data.get("defense", "")), str(data.get("path", "")), dists,
                 dict(data.get("default", {})), pairs)
