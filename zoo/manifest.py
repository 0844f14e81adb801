"""Victims trained anywhere, listed by hand: the ``--victims FILE.yaml`` manifest.

::

    victims:
      - name: my-badnets                      # its name in --attacks, reports and tables
        weights: my-badnets.safetensors       # .safetensors, or .pt/.pth (weights_only=True)
        arch: cnn                             # a registered arch (zoo.models.ARCHS)
        num_classes: 10                       # must be the data's
        target: 0                             # the backdoor's target class
        dataset: digits                       # optional: then --dataset must be this
        normalization: {mean: [0.5], std: [0.5]}  # optional: the model's input normalization
                                              # (per channel, in [0, 1] units); else the data's
        triggered: my-badnets-triggered.npz   # the triggered test set, TRUE labels: an .npz
                                              # (x uint8 images, y labels) or a folder
                                              # DIR/<label>/*.png; cut into val and test halves
                                              # (stratified, from --seed)
        # or  triggered: {val: a.npz, test: b.npz}   the two halves given (zoo --export)
        # or  attack: {name: badnets, params: {patch: 3}}
        #     a built-in trigger regenerated on the data (an attack that needs no model to
        #     build its trigger; params as the attack's constructor, ``seed`` included)

Paths are relative to the manifest's folder. A name is 1-64 letters, digits, '_', '.', '-',
not a built-in attack's name (those name the zoo's own victims) and not ``bb:...``.

Validation happens before anything runs: the file is a small regular file (at most 256 KiB)
read by the strict loader of :mod:`zoo.yamlsafe` (no aliases, no key twice, at most 6
levels), every key is known and typed, each weights file is a regular file and each triggered
path exists. Errors are one line: ``FILE: victim 'NAME': KEY: problem``.

:func:`store_victim` reads the files, fits the weights to the arch (:mod:`zoo.external`) and
keeps the victim in the store, keyed by the hash of its weights, triggered images and
description, so the same files are read once per run and their metrics measured once.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.attacks import ATTACKS, make_attack
from zoo.data import DataError, DatasetInfo, Split
from zoo.external import (
    ExternalError,
    check_name,
    check_regular,
    fit_state_dict,
    load_weights,
    put_external,
    read_triggered,
    split_sha256,
    state_sha256,
    with_normalization,
)
from zoo.models import ARCHS
from zoo.store import Entry, Store
from zoo.yamlsafe import strict_loader

__all__ = ["ManifestError", "ManifestVictim", "load_manifest", "manifest_document",
           "store_victim"]

MAX_BYTES = 256 << 10
MAX_DEPTH = 6
MAX_VICTIMS = 256
REQUIRED = ("name", "weights", "arch", "num_classes", "target")
OPTIONAL = ("dataset", "normalization", "triggered", "attack")

_Loader = strict_loader("a victims manifest", MAX_DEPTH)


class ManifestError(DataError):
    """A victims manifest that cannot be used; one line naming the file, victim and key."""


@dataclass(frozen=True)
class ManifestVictim:
    """One checked manifest entry (paths absolute)."""

    file: Path
    name: str
    weights: Path
    arch: str
    num_classes: int
    target: int
    dataset: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    triggered: Path | None = None
    triggered_val: Path | None = None
    triggered_test: Path | None = None
    attack: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)

    def where(self, key: str) -> str:
        return f"{self.file}: victim {self.name!r}: {key}"


# ---------------------------------------------------------------------------------------------
# Reading and checking the file
# ---------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path}: not a regular file: expected a YAML victims manifest")
        if st.st_size > MAX_BYTES:
            raise ManifestError(f"{path}: {st.st_size} bytes: expected a manifest of at most "
                                f"{MAX_BYTES} bytes")
        with open(path, "rb") as fh:
            text = fh.read(MAX_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the victims manifest ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:100]})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise ManifestError(f"{path}: invalid YAML{at}: {' '.join(str(problem).split())[:100]}"
                            ) from None


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _whole(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ManifestError(f"{where} = {_clip(value)}: expected a whole number >= {low}")
    return value


def _path(base: Path, where: str, value: Any, *, folder_ok: bool) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{where} = {_clip(value)}: expected a file path")
    path = (base / Path(value).expanduser()).absolute()
    if folder_ok and path.is_dir():
        return path
    try:
        check_regular(path, what="file")
    except ExternalError as exc:
        kind = "a file or a folder" if folder_ok else "a file"
        raise ManifestError(f"{where} = {_clip(value)}: expected {kind} ({exc})") from None
    return path


def _normalization(where: str, value: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    ok = isinstance(value, dict) and set(value) == {"mean", "std"} and all(
        isinstance(value[k], list) and value[k] and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value[k]) for k in ("mean", "std"))
    if not ok:
        raise ManifestError(f"{where} = {_clip(value)}: expected {{mean: [..], std: [..]}}, one "
                            "finite number per channel")
    mean, std = tuple(float(v) for v in value["mean"]), tuple(float(v) for v in value["std"])
    if len(mean) != len(std) or min(std) <= 0:
        raise ManifestError(f"{where} = {_clip(value)}: expected as many means as stds, "
                            "each std > 0")
    return mean, std


def _attack(where: str, value: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(value, dict) or "name" not in value or set(value) - {"name", "params"}:
        raise ManifestError(f"{where} = {_clip(value)}: expected {{name: ATTACK, params: {{...}}}}")
    name, params = value["name"], value.get("params") or {}
    cls = ATTACKS.get(name) if isinstance(name, str) else None
    if cls is None or name == "none" or cls.needs_preparation:
        usable = [a for a, c in ATTACKS.items() if a != "none" and not c.needs_preparation]
        raise ManifestError(f"{where}.name = {_clip(name)}: expected an attack whose trigger "
                            f"needs no model to build: {', '.join(usable)} (else give "
                            "'triggered')")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ManifestError(f"{where}.params = {_clip(params)}: expected a mapping")
    for key in ("target",):
        if key in params:
            raise ManifestError(f"{where}.params.{key}: give the victim's 'target' instead")
    return name, dict(params)


def _victim(file: Path, index: int, raw: Any, seen: set[str]) -> ManifestVictim:
    at = f"{file}: victims[{index}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{at}: expected a mapping with keys {', '.join(REQUIRED)}")
    try:
        name = check_name(raw.get("name"), "name")
    except ExternalError as exc:
        raise ManifestError(f"{at}: {exc}") from None
    where = f"{file}: victim {name!r}:"
    if name in ATTACKS:
        raise ManifestError(f"{where} name: {name!r} is a built-in attack's victim: expected "
                            f"another name (e.g. my-{name})")
    if name in seen:
        raise ManifestError(f"{where} name: given twice: expected each victim once")
    seen.add(name)
    unknown = sorted(str(k) for k in raw if k not in (*REQUIRED, *OPTIONAL))
    if unknown:
        raise ManifestError(f"{where} {_clip(unknown[0], 40)}: unknown key: expected "
                            f"{', '.join((*REQUIRED, *OPTIONAL))}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ManifestError(f"{where} {missing[0]}: missing")
    if raw["arch"] not in ARCHS:
        raise ManifestError(f"{where} arch = {_clip(raw['arch'])}: expected one of "
                            f"{', '.join(ARCHS)}")
    num_classes = _whole(f"{where} num_classes", raw["num_classes"], 2)
    target = _whole(f"{where} target", raw["target"], 0)
    if target >= num_classes:
        raise ManifestError(f"{where} target = {target}: expected 0..{num_classes - 1}")
    dataset = raw.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise ManifestError(f"{where} dataset = {_clip(dataset)}: expected a dataset name")
    base = file.parent
    out: dict[str, Any] = {"file": file, "name": name, "arch": raw["arch"],
                           "num_classes": num_classes, "target": target, "dataset": dataset,
                           "weights": _path(base, f"{where} weights", raw["weights"],
                                            folder_ok=False)}
    if "normalization" in raw:
        out["mean"], out["std"] = _normalization(f"{where} normalization", raw["normalization"])
    if ("triggered" in raw) == ("attack" in raw):
        raise ManifestError(f"{where} triggered: expected exactly one of 'triggered' (the "
                            "triggered test set) and 'attack' (a built-in trigger)")
    if "attack" in raw:
        out["attack"], out["attack_params"] = _attack(f"{where} attack", raw["attack"])
    elif isinstance(raw["triggered"], dict):
        given = raw["triggered"]
        if set(given) != {"val", "test"}:
            raise ManifestError(f"{where} triggered = {_clip(given)}: expected a path, or "
                                "{val: PATH, test: PATH}")
        for half in ("val", "test"):
            out[f"triggered_{half}"] = _path(base, f"{where} triggered.{half}", given[half],
                                             folder_ok=True)
    else:
        out["triggered"] = _path(base, f"{where} triggered", raw["triggered"], folder_ok=True)
    return ManifestVictim(**out)


def load_manifest(path: str | Path) -> tuple[ManifestVictim, ...]:
    """The checked victims of manifest ``path`` (see the module docstring); ManifestError."""
    file = Path(path).expanduser().absolute()
    doc = _read(file)
    if not isinstance(doc, dict) or set(doc) != {"victims"}:
        keys = sorted(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise ManifestError(f"{file}: top level {_clip(keys)}: expected one key, 'victims'")
    victims = doc["victims"]
    if not isinstance(victims, list) or not 1 <= len(victims) <= MAX_VICTIMS:
        raise ManifestError(f"{file}: victims: expected a list of 1 to {MAX_VICTIMS} victims")
    seen: set[str] = set()
    return tuple(_victim(file, i, raw, seen) for i, raw in enumerate(victims))


# ---------------------------------------------------------------------------------------------
# Into the store
# ---------------------------------------------------------------------------------------------


def _triggered(mv: ManifestVictim, info: DatasetInfo
               ) -> tuple[str, dict[str, dict[str, torch.Tensor]], dict[str, Any] | None]:
    """(kind, tensor groups, the attack's params for a built-in trigger)."""
    def read(path: Path, key: str) -> Split:
        return read_triggered(path, channels=info.channels, size=info.size,
                              num_classes=info.num_classes, target=mv.target, what=mv.where(key))

    if mv.triggered is not None:
        s = read(mv.triggered, "triggered")
        return "split", {"triggered": {"x": s.x, "y": s.y}}, None
    if mv.triggered_val is not None and mv.triggered_test is not None:
        val = read(mv.triggered_val, "triggered.val")
        test = read(mv.triggered_test, "triggered.test")
        return "halves", {"triggered_val": {"x": val.x, "y": val.y},
                          "triggered_test": {"x": test.x, "y": test.y}}, None
    assert mv.attack is not None
    params = dict(mv.attack_params)
    seed = params.pop("seed", 0)
    try:
        attack = make_attack(mv.attack, info, target=mv.target, seed=seed, **params)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{mv.where('attack')}: {exc}") from None
    return "attack", {"attack": attack.state()}, attack.params()


def store_victim(mv: ManifestVictim, store: Store, data: DatasetInfo) -> Entry:
    """Read ``mv``'s files, check them against the data (``data``: the dataset's facts), and
    keep the victim in ``store`` (once per content); returns the entry."""
    if mv.dataset is not None and mv.dataset != data.name:
        raise ManifestError(f"{mv.where('dataset')} = {mv.dataset!r}: the run's --dataset is "
                            f"{data.name!r}: expected the same")
    if mv.num_classes != data.num_classes:
        raise ManifestError(f"{mv.where('num_classes')} = {mv.num_classes}: the data has "
                            f"{data.num_classes} classes: expected the same")
    try:
        info = with_normalization(data, mv.mean, mv.std, where=mv.where("normalization"))
        state, renamed = fit_state_dict(load_weights(mv.weights, what=mv.where("weights")),
                                        mv.arch, info, where=mv.where("weights"))
        kind, groups, attack_params = _triggered(mv, info)
    except ExternalError as exc:
        raise ManifestError(str(exc)) from None
    description: dict[str, Any] = {
        "source": "manifest", "arch": mv.arch, "dataset": data.name, "channels": info.channels,
        "size": info.size, "num_classes": info.num_classes, "mean": list(info.mean),
        "std": list(info.std), "target": mv.target, "weights_sha256": state_sha256(state),
        "triggered": kind,
    }
    if kind == "attack":
        description["attack_params"] = attack_params
    else:
        splits = [Split(g["x"], g["y"]) for g in groups.values()]
        description["triggered_sha256"] = split_sha256(*splits)
    meta = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "origin": {"manifest": str(mv.file), "name": mv.name, "weights": str(mv.weights),
                       "renamed_by_position": renamed}}
    tensors: dict[str, dict[str, torch.Tensor]] = {"model": state, **groups}
    return put_external(store, description, tensors, meta)


# ---------------------------------------------------------------------------------------------
# Writing (python -m tuner zoo --export)
# ---------------------------------------------------------------------------------------------


def manifest_document(rows: Sequence[dict[str, Any]], *, header: str = "") -> str:
    """A manifest's text for ``rows`` (mappings of the keys above, paths as given)."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    body = yaml.safe_dump({"victims": [dict(r) for r in rows]}, sort_keys=False,
                          default_flow_style=None, width=100)
    return "\n".join([*lines, body]) if lines else body
