"""``python -m tuner zoo``: build (or load) the victims and print their no-defense metrics.

    python -m tuner zoo --dataset digits --attacks badnets,blended,wanet,sig
    python -m tuner zoo --attacks badnets --json        # only a JSON list on stdout
    python -m tuner zoo --attacks badnets --export DIR  # DIR/victims.yaml, weights, triggered

Progress goes to stderr; stdout holds the table (or, with ``--json``, only the JSON list).

``--export DIR`` writes the victims in the form ``--victims`` reads (zoo/manifest.py): per
victim ``NAME.safetensors`` (its weights), ``NAME.triggered-val.npz`` and
``NAME.triggered-test.npz`` (its triggered val and test sets: non-target images with their
true labels, ``x`` uint8 N x C x H x W and ``y``), and one ``victims.yaml`` listing them with
arch, classes, target, dataset and normalization. NAME is ``<dataset>-<attack>`` for the zoo's
own victims, ``bb-NAME`` for ``bb:NAME``. ``--victims DIR/victims.yaml`` then gives the same
victims (same weights, same triggered halves, so the same numbers), and the test half is the
set ``evaluate`` measures ASR on (``purify --triggered``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save as save_safetensors

from tuner import flags
from tuner._io import write_bytes, write_text
from tuner.errors import UsageError
from tuner.spec import check_writable, victims_default
from zoo.backdoorbench import PREFIX as BB_PREFIX
from zoo.data import Split
from zoo.manifest import manifest_document
from zoo.victims import Victim, ZooSpec, check_zoo_dir, get_victims, prepare_attacks

MANIFEST = "victims.yaml"


@dataclass(frozen=True)
class ZooCommand:
    zoo: ZooSpec = field(default_factory=ZooSpec, metadata={"title": "data and victims"})
    json: bool = field(default=False, metadata={
        "help": "print only a JSON list of the victims' metrics on stdout"})
    export: Path | None = field(default=None, metadata={
        "help": f"also write the victims into DIR as a manifest ({MANIFEST}, weights as "
                ".safetensors, triggered val/test sets as .npz) that --victims reads",
        "metavar": "DIR"})

    def __post_init__(self) -> None:
        if self.export is not None:
            object.__setattr__(self, "export", Path(self.export).expanduser().absolute())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ZooCommand)


def _row(v: Victim) -> dict[str, Any]:
    test, val = v.metrics["test"], v.metrics["val"]
    return {
        "attack": v.attack, "dataset": v.dataset, "arch": v.arch, "target": v.target,
        "poison_rate": v.poison_rate,
        "acc": test.acc, "asr": test.asr, "ra": test.ra,
        "val_acc": val.acc, "val_asr": val.asr, "val_ra": val.ra,
        "built": v.built, "seconds": round(v.seconds, 3),
        "train_seconds": round(v.train_seconds, 3), "key": v.key, "source": v.source,
    }


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'attack':<10} {'rate':>5} {'val ACC':>7} {'val ASR':>7} {'val RA':>7}  "
            f"{'ACC':>6} {'ASR':>6} {'RA':>6} {'seconds':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        status = "built" if r["built"] else "loaded" if r["source"] == "zoo" else r["source"]
        lines.append(
            f"{r['attack']:<10} {_rate(r['poison_rate']):>5} {r['val_acc']:7.2f} "
            f"{r['val_asr']:7.2f} {r['val_ra']:7.2f}  {r['acc']:6.2f} {r['asr']:6.2f} "
            f"{r['ra']:6.2f} {r['seconds']:8.3f}  {status}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --export
# ---------------------------------------------------------------------------------------------


def export_name(v: Victim) -> str:
    """The victim's name in an exported manifest (never a built-in attack's name)."""
    if v.source == "manifest":
        return v.attack
    if v.attack.startswith(BB_PREFIX):
        return "bb-" + v.attack[len(BB_PREFIX):]
    return f"{v.dataset}-{v.attack}"


def _npz(split: Split) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=split.x.cpu().numpy(), y=split.y.cpu().numpy().astype(np.int64))
    return buf.getvalue()


def export(victims: list[Victim], out: Path, spec: ZooSpec) -> Path:
    """Write ``victims`` into ``out`` as a manifest; returns the manifest's path."""
    names = [export_name(v) for v in victims]
    if len(set(names)) != len(names):
        raise UsageError(f"--export: two victims would both be named {names}: expected "
                         "distinct names")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v, name in zip(victims, names, strict=True):
        weights = f"{name}.safetensors"
        meta = {"arch": v.arch, "num_classes": str(v.info.num_classes), "target": str(v.target),
                "dataset": v.dataset, "victim": v.attack}
        write_bytes(out / weights, save_safetensors(
            {k: t.detach().cpu().contiguous().clone() for k, t in v.state_dict.items()},
            metadata=meta))
        halves = {}
        for half, split in (("val", v.bd_val), ("test", v.bd_test)):
            halves[half] = f"{name}.triggered-{half}.npz"
            write_bytes(out / halves[half], _npz(split))
        rows.append({"name": name, "weights": weights, "arch": v.arch,
                     "num_classes": v.info.num_classes, "target": v.target,
                     "dataset": v.dataset,
                     "normalization": {"mean": list(v.info.mean), "std": list(v.info.std)},
                     "triggered": halves})
    header = (f"Victims exported by `python -m tuner zoo --export` ({spec.dataset}, split seed "
              f"{spec.seed}).\nUse them with: python -m tuner --victims {out / MANIFEST} "
              f"--dataset {spec.dataset} ...\n"
              "triggered: each victim's triggered val and test halves (non-target images, true "
              "labels);\nthe test half is the one `evaluate` measures ASR on (purify --triggered)."
              "\nFormat: zoo/manifest.py.")
    path = out / MANIFEST
    write_text(path, manifest_document(rows, header=header))
    return path


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(ZooCommand, args)
    spec = victims_default(cmd.zoo, args)
    if cmd.export is not None:
        check_writable(cmd.export)
    check_zoo_dir(spec)
    splits = spec.load_splits()
    prepare_attacks(spec, None, splits)  # every attack checked before anything is trained
    start = time.perf_counter()
    victims = get_victims(spec, splits=splits, progress=True)
    rows = [_row(v) for v in victims]
    if cmd.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"{spec.dataset} / {spec.arch}, target 0 (metrics in %, ACC/ASR/RA on test; "
              "rate = poison rate)")
        print(_table(rows))
        print(f"total {time.perf_counter() - start:.1f} s")
    if cmd.export is not None:
        path = export(victims, cmd.export, spec)
        print(f"exported {len(victims)} victim(s): {path}", file=sys.stderr)
    return 0
