"""Command-line flags generated from spec dataclasses: each default and choice list lives once,
in the dataclass field that the flag fills.

A field becomes ``--field-name`` with its type (``int``, ``float``, ``str``, ``Path``, ``bool``,
``Literal[...]``, ``tuple[str, ...]`` as a comma-separated list, any of them ``| None``), its
help text and choices from ``field(metadata=...)``, and its default stated in the help. A field
whose type is itself a spec dataclass (``ExperimentSpec.zoo``) adds that dataclass's flags as a
group. Metadata keys:

- ``help`` (required): one line on what the value means;
- ``choices``: the allowed values (a ``Literal`` type gives them too);
- ``smoke``: the value under ``--smoke-test`` when the flag is not given;
- ``default_text``: how to state a default that is computed (``None`` means "see this");
- ``flag``: the flag's name where it is not ``--field-name``; ``positional``: an argument;
- ``metavar``, ``group``; ``cli: False`` keeps a field off the command line.

Every flag's argparse default is "not given", so a value the user did not type never reaches
the dataclass, whose own default then applies: :func:`build` returns the dataclass.

>>> import argparse, dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Demo:
...     epochs: int = dataclasses.field(default=3, metadata={"help": "passes"})
>>> p = argparse.ArgumentParser(); add_flags(p, Demo)
>>> build(Demo, p.parse_args([])), build(Demo, p.parse_args(["--epochs", "5"]))
(Demo(epochs=3), Demo(epochs=5))
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tuner.errors import UsageError

__all__ = ["add_flags", "build", "flag_name", "given", "parse_list"]


def flag_name(f: dataclasses.Field) -> str:
    """``--num-samples`` for field ``num_samples`` (or the field's ``flag`` metadata)."""
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def parse_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _base(tp: Any) -> Any:
    """The annotation without ``| None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _is_spec(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("cli", True) and (f.metadata.get("help") or
                                                           _is_spec(_base(hints[f.name])))]


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help(f: dataclasses.Field) -> str:
    text = str(f.metadata["help"])
    if "default_text" in f.metadata:
        default = str(f.metadata["default_text"])
    elif f.default is dataclasses.MISSING or f.default is None:
        default = ""
    elif isinstance(f.default, bool):
        default = "" if not f.default else "on"
    else:
        default = _show(f.default)
    if "smoke" in f.metadata:
        default = f"{default or 'none'}; {_show(f.metadata['smoke'])} with --smoke-test"
    return f"{text} (default {default})" if default else text


def _converter(name: str, tp: Any) -> Callable[[str], Any]:
    """The argparse ``type=``: parse, or fail naming the flag and what was expected."""
    def convert(text: str) -> Any:
        try:
            return tp(text)
        except (TypeError, ValueError):
            what = {int: "a whole number", float: "a number"}.get(tp, tp.__name__)
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
    convert.__name__ = name
    return convert


def _add_one(group: Any, f: dataclasses.Field, tp: Any) -> None:
    meta = f.metadata
    tp = _base(tp)
    kwargs: dict[str, Any] = {"help": _help(f), "default": argparse.SUPPRESS}
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    choices = meta.get("choices")
    if typing.get_origin(tp) is Literal:
        choices, tp = typing.get_args(tp), str
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
    elif typing.get_origin(tp) is tuple:
        kwargs["type"] = parse_list
        kwargs.setdefault("metavar", "A,B,...")
        if choices:  # checked by the spec itself, named in help
            kwargs["help"] += f"; any of {', '.join(map(str, choices))}"
    else:
        kwargs["type"] = Path if tp is Path else _converter(f.name, tp)
        if choices:
            kwargs["choices"] = tuple(choices)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    if meta.get("positional"):
        kwargs.pop("default")
        kwargs.pop("required", None)
        group.add_argument(f.name, **kwargs)
    else:
        group.add_argument(flag_name(f), dest=f.name, **kwargs)


def add_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (),
              title: str | None = None) -> None:
    """Add a flag for each command-line field of dataclass ``cls`` (nested specs as groups)."""
    groups: dict[str, Any] = {}
    default = parser.add_argument_group(title) if title else parser
    for f, tp in _cli_fields(cls):
        if f.name in exclude:
            continue
        if _is_spec(_base(tp)):
            add_flags(parser, _base(tp), exclude=exclude, title=f.metadata.get("title", f.name))
            continue
        name = f.metadata.get("group")
        if name and name not in groups:
            groups[name] = parser.add_argument_group(name)
        _add_one(groups[name] if name else default, f, tp)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s fields that the user typed (nested specs left out)."""
    return {f.name: getattr(args, f.name) for f, tp in _cli_fields(cls)
            if hasattr(args, f.name) and not _is_spec(_base(tp))}


def build(cls: type, args: argparse.Namespace, *, smoke: bool = False, **fixed: Any) -> Any:
    """``cls`` from the flags the user gave; ``--smoke-test`` values where ``smoke`` and a flag
    with a ``smoke`` value was not given; ``fixed`` wins over both. Nested specs are built too.

    Errors of the dataclass's own checks are raised as they are (one line naming the flag).
    """
    values: dict[str, Any] = {}
    for f, tp in _cli_fields(cls):
        if _is_spec(_base(tp)):
            values[f.name] = build(_base(tp), args, smoke=smoke)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        elif smoke and "smoke" in f.metadata:
            values[f.name] = f.metadata["smoke"]
    values.update(fixed)
    try:
        return cls(**values)
    except TypeError as exc:  # a wrong type that no check of the dataclass caught
        raise UsageError(f"{cls.__name__}: {exc}") from None
