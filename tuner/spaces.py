"""Declarative search spaces: ``search_spaces/<defense>.yaml`` -> Optuna distributions.

File format (one file per defense; keys are fields of the defense's ``Config``)::

    defense: ngf                       # must match the defense the file is loaded for
    params:                            # name -> distribution
      lr:       {type: float, low: 1.0e-3, high: 5.0e-2, log: true}
      damping:  {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
      epochs:   {type: int, low: 3, high: 10}            # optional: step (int), log
      adaptive: {type: categorical, choices: [true, false]}
    default: {lr: 0.01}                # optional; see "default point" below
    constraints: ["lr_base < lr_max2"] # optional strict orderings between float/int params

- ``float``: ``low``, ``high``, optional ``log`` (both bounds > 0). ``int``: integer ``low``,
  ``high``, optional ``log`` or ``step`` (not both; ``high - low`` a multiple of ``step``).
  ``categorical``: a non-empty list of ``choices`` (bool, int, float or str). ``low < high``
  always (a one-point range is a fixed value: leave the key out and let the Config default
  hold). ``1e-3`` is read as a number (plain YAML 1.1 would read it as text).
- Every value must suit the Config field's type: a float field takes float, int or numeric
  categorical; an int field takes int or integer categorical; a bool field only categorical
  bools; a str/Literal field only categorical strings (among the Literal's values).
- **Default point.** ``Space.default`` holds a value for every searched param: the file's
  ``default`` entry where it gives one (checked to lie inside the range / among the choices),
  otherwise the value of ``make_config(defense, dataset=dataset)`` -- the paper default with
  the dataset's documented overrides. The shipped files give no explicit defaults, so the first
  point of every search is exactly the defense's own default config for the dataset. A default
  taken from the Config may lie outside a range narrowed for speed (e.g. 100 epochs on CIFAR-10
  against the digits-sized epoch range); it is still evaluated as the reference point.
- **Constraints.** SFT needs ``lr_base < lr_max2 < lr_max1``. Instead of rejecting sampled
  configs (wasted trials, a ragged surface for TPE), the shipped file gives the three rates
  disjoint ranges, so every sample satisfies the order by construction; ``constraints`` states
  the order and the loader checks that the ranges (and explicit defaults) guarantee it.

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
import re
import typing
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

from tuner.errors import UsageError

__all__ = ["Space", "SpaceError", "load_space", "space_from_json", "space_to_json", "shipped_spaces"]

TOP_KEYS = ("defense", "params", "default", "constraints")
TYPES = ("float", "int", "categorical")
_KEYS = {"float": {"type", "low", "high", "log"},
         "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}


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


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as JSON and Python do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def shipped_spaces() -> list[str]:
    """Names of the defenses with a shipped ``search_spaces/<name>.yaml``."""
    root = importlib.resources.files("search_spaces")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_text(defense: str, path: str | Path | None) -> tuple[str, str]:
    if path is not None:
        p = Path(path)
        try:
            return str(p), p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(f"{p}: cannot read the search space file ({exc.__class__.__name__}: "
                             f"{exc}): expected a readable YAML file") from None
    res = importlib.resources.files("search_spaces") / f"{defense}.yaml"
    if not res.is_file():
        raise SpaceError(f"search_spaces/{defense}.yaml: no shipped search space for defense "
                         f"{defense!r}: expected one of {', '.join(shipped_spaces())} or --space FILE")
    return f"search_spaces/{defense}.yaml", res.read_text(encoding="utf-8")


def _parse(where: str, text: str) -> dict[str, Any]:
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{where}: invalid YAML{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}, "
                         f"got {type(doc).__name__}")
    unknown = sorted(str(k) for k in doc if k not in TOP_KEYS)
    if unknown:
        raise SpaceError(f"{where}: unknown top-level key {unknown[0]!r}: expected "
                         f"{', '.join(TOP_KEYS)}")
    return doc


# ---------------------------------------------------------------------------------------------
# Config field types
# ---------------------------------------------------------------------------------------------


def _config_cls(defense: str) -> type:
    from defenses import get_defense

    try:
        return get_defense(defense).config_cls
    except (KeyError, ValueError) as exc:
        raise SpaceError(f"unknown defense {defense!r}: {exc}") from None


def _field_types(config_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_cls)}


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """(base type, Literal values or ()) with Optional[...] removed."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return type(values[0]), values
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return _unwrap(args[0]) if len(args) == 1 else (Any, ())
    return tp, ()


def _value_fits(value: Any, tp: Any) -> bool:
    base, literal = _unwrap(tp)
    if literal:
        return value in literal and type(value) is type(literal[0])
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return True


def _kind_fits(kind: str, tp: Any) -> bool:
    base, literal = _unwrap(tp)
    if kind == "float":
        return base is float and not literal
    if kind == "int":
        return base in (int, float) and not literal
    return True  # categorical: each choice is checked with _value_fits


# ---------------------------------------------------------------------------------------------
# One parameter
# ---------------------------------------------------------------------------------------------


def _number(where: str, name: str, key: str, value: Any, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        want = "an integer" if integer else "a number"
        raise SpaceError(f"{where}: params.{name}.{key} = {value!r}: expected {want}")
    if not math.isfinite(value):
        raise SpaceError(f"{where}: params.{name}.{key} = {value!r}: expected a finite number")
    return value


def _range(where: str, name: str, spec: dict[str, Any], kind: str) -> BaseDistribution:
    for key in ("low", "high"):
        if key not in spec:
            raise SpaceError(f"{where}: params.{name}: missing {key!r} for type {kind}")
    integer = kind == "int"
    low = _number(where, name, "low", spec["low"], integer)
    high = _number(where, name, "high", spec["high"], integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: params.{name}.log = {log!r}: expected true or false")
    if low >= high:
        raise SpaceError(f"{where}: params.{name}: empty range low={low!r} >= high={high!r}: "
                         f"expected low < high")
    if log and low <= 0:
        raise SpaceError(f"{where}: params.{name}: log scale needs low > 0, got low={low!r}")
    if not integer:
        return FloatDistribution(float(low), float(high), log=log)
    step = spec.get("step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise SpaceError(f"{where}: params.{name}.step = {step!r}: expected an integer >= 1")
    if log and step != 1:
        raise SpaceError(f"{where}: params.{name}: log and step={step} cannot be combined")
    if (high - low) % step:
        raise SpaceError(f"{where}: params.{name}: high - low = {high - low} is not a multiple "
                         f"of step={step}")
    return IntDistribution(int(low), int(high), log=log, step=step)


def _categorical(where: str, name: str, spec: dict[str, Any], tp: Any) -> BaseDistribution:
    if "choices" not in spec:
        raise SpaceError(f"{where}: params.{name}: missing 'choices' for type categorical")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise SpaceError(f"{where}: params.{name}.choices = {choices!r}: expected a non-empty list")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise SpaceError(f"{where}: params.{name}.choices: {c!r} is not a bool, number or string")
        if isinstance(c, float) and not math.isfinite(c):
            raise SpaceError(f"{where}: params.{name}.choices: {c!r} is not finite")
        if not _value_fits(c, tp):
            raise SpaceError(f"{where}: params.{name}.choices: {c!r} does not suit the Config "
                             f"field type {_type_name(tp)}")
    if len({(type(c), c) for c in choices}) != len(choices):
        raise SpaceError(f"{where}: params.{name}.choices = {choices!r}: duplicate choices")
    return CategoricalDistribution(choices)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _distribution(where: str, name: str, spec: Any, tp: Any) -> BaseDistribution:
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: params.{name}: expected a mapping such as "
                         f"{{type: float, low: 0.001, high: 0.1, log: true}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise SpaceError(f"{where}: params.{name}.type = {kind!r}: expected one of {', '.join(TYPES)}")
    extra = sorted(str(k) for k in spec if k not in _KEYS[kind])
    if extra:
        raise SpaceError(f"{where}: params.{name}: unknown key {extra[0]!r} for type {kind}: "
                         f"expected {', '.join(sorted(_KEYS[kind]))}")
    if not _kind_fits(kind, tp):
        raise SpaceError(f"{where}: params.{name}: type {kind} does not suit the Config field "
                         f"type {_type_name(tp)}")
    if kind == "categorical":
        return _categorical(where, name, spec, tp)
    return _range(where, name, spec, kind)


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
    return dist.low <= value <= dist.high


def _defaults(where: str, doc: dict[str, Any], dists: dict[str, BaseDistribution],
              defense: str, dataset: str | None) -> dict[str, Any]:
    given = doc.get("default") or {}
    if not isinstance(given, dict):
        raise SpaceError(f"{where}: default: expected a mapping param -> value, got {given!r}")
    for name, value in given.items():
        if name not in dists:
            raise SpaceError(f"{where}: default.{name}: not a searched param: expected one of "
                             f"{', '.join(dists)}")
        if not _inside(value, dists[name]):
            raise SpaceError(f"{where}: default.{name} = {value!r} is outside its distribution "
                             f"{_describe(dists[name])}")
    from defenses import make_config

    base = dataclasses.asdict(make_config(defense, dataset=dataset))
    return {name: given[name] if name in given else base[name] for name in dists}


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    scale = ", log" if dist.log else ""
    return f"[{dist.low}, {dist.high}{scale}]"


_ORDER = re.compile(r"^\s*(\w+)\s*<\s*(\w+)\s*$")


def _constraints(where: str, doc: dict[str, Any], dists: dict[str, BaseDistribution],
                 default: dict[str, Any], explicit: set[str]) -> tuple[tuple[str, str], ...]:
    raw = doc.get("constraints") or []
    if not isinstance(raw, list):
        raise SpaceError(f"{where}: constraints: expected a list such as ['a < b'], got {raw!r}")
    out = []
    for text in raw:
        m = _ORDER.match(text) if isinstance(text, str) else None
        if m is None:
            raise SpaceError(f"{where}: constraints: {text!r}: expected 'param_a < param_b'")
        a, b = m.groups()
        for n in (a, b):
            if n not in dists or isinstance(dists[n], CategoricalDistribution):
                raise SpaceError(f"{where}: constraints: {text!r}: {n!r} is not a searched "
                                 f"float/int param")
        if not dists[a].high < dists[b].low:
            raise SpaceError(f"{where}: constraints: {text!r}: ranges overlap (high of {a} "
                             f"{dists[a].high} >= low of {b} {dists[b].low}): expected disjoint "
                             f"ranges so every sample satisfies it")
        if {a, b} <= explicit and not default[a] < default[b]:
            raise SpaceError(f"{where}: default: {a}={default[a]!r} < {b}={default[b]!r} is "
                             f"violated (constraint {text!r})")
        out.append((a, b))
    return tuple(out)


def _ends(dists: dict[str, BaseDistribution], end: int) -> dict[str, Any]:
    """The space's lower (end=0) or upper (end=-1) corner; a categorical's first/last choice."""
    out = {}
    for name, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            out[name] = d.choices[end]
        else:
            out[name] = d.low if end == 0 else d.high
    return out


def _check_values(where: str, defense: str, dists: dict[str, BaseDistribution],
                  default: dict[str, Any], dataset: str | None) -> None:
    """The Config accepts both corners of the space, every choice, and the default point."""
    from defenses import ConfigError, make_config

    low = _ends(dists, 0)
    points = [("lower corner", low), ("upper corner", _ends(dists, -1)), ("default", default)]
    for name, d in dists.items():
        if isinstance(d, CategoricalDistribution):
            points += [(f"choice {name}={c!r}", {**low, name: c}) for c in d.choices[1:-1]]
    for label, point in points:
        try:
            make_config(defense, point, dataset=dataset)
        except ConfigError as exc:
            raise SpaceError(f"{where}: params: the {defense} Config rejects the space's {label} "
                             f"{point}: {exc}") from None


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
        raise SpaceError(f"{where}: defense = {doc.get('defense')!r}: expected {defense!r} "
                         f"(the defense this space is loaded for)")
    params = doc.get("params")
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{where}: params: expected a non-empty mapping name -> distribution")
    types = _field_types(_config_cls(defense))
    dists: dict[str, BaseDistribution] = {}
    for name, spec in params.items():
        if name not in types:
            raise SpaceError(f"{where}: params.{name}: not a field of the {defense} Config: "
                             f"expected one of {', '.join(types)}")
        dists[name] = _distribution(where, name, spec, types[name])
    default = _defaults(where, doc, dists, defense, dataset)
    for name, value in (doc.get("default") or {}).items():
        if not _value_fits(value, types[name]):
            raise SpaceError(f"{where}: default.{name} = {value!r} does not suit the Config "
                             f"field type {_type_name(types[name])}")
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
    dists = {k: json_to_distribution(json.dumps(v)) for k, v in data.get("params", {}).items()}
    pairs = tuple(tuple(c.replace(" ", "").split("<")) for c in data.get("constraints", []))
    return Space(data.get("defense", ""), data.get("path", ""), dists,
                 dict(data.get("default", {})), pairs)  # type: ignore[arg-type]
