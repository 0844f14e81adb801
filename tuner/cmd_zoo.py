"""``python -m tuner zoo``: build (or load) the victims and print their no-defense metrics.

    python -m tuner zoo --dataset digits --attacks badnets,blended,wanet,sig
    python -m tuner zoo --attacks badnets --json        # only a JSON list on stdout

Progress goes to stderr; stdout holds the table (or, with ``--json``, only the JSON list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tuner import flags
from zoo.victims import Victim, ZooSpec, get_victims, prepare_attacks


@dataclass(frozen=True)
class ZooCommand:
    zoo: ZooSpec = field(default_factory=ZooSpec, metadata={"title": "data and victims"})
    json: bool = field(default=False, metadata={
        "help": "print only a JSON list of the victims' metrics on stdout"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ZooCommand)


def _row(v: Victim) -> dict[str, Any]:
    test, val = v.metrics["test"], v.metrics["val"]
    return {
        "attack": v.attack, "dataset": v.dataset, "arch": v.arch, "target": v.target,
        "poison_rate": v.poison_rate,
        "acc": test.acc, "asr": test.asr, "ra": test.ra,
        "val_acc": val.acc, "val_asr": val.asr, "val_ra": val.ra,
        "built": v.built, "seconds": round(v.seconds, 3), "train_seconds": round(v.train_seconds, 3),
        "key": v.key,
    }


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:g}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'attack':<10} {'rate':>5} {'val ACC':>7} {'val ASR':>7} {'val RA':>7}  "
            f"{'ACC':>6} {'ASR':>6} {'RA':>6} {'seconds':>8}  status")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['attack']:<10} {_rate(r['poison_rate']):>5} {r['val_acc']:7.2f} "
            f"{r['val_asr']:7.2f} {r['val_ra']:7.2f}  {r['acc']:6.2f} {r['asr']:6.2f} "
            f"{r['ra']:6.2f} {r['seconds']:8.3f}  {'built' if r['built'] else 'loaded'}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(ZooCommand, args)
    spec = cmd.zoo
    splits = spec.load_splits()
    prepare_attacks(spec, None, splits)  # every attack checked before anything is trained
    start = time.perf_counter()
    rows = [_row(v) for v in get_victims(spec, splits=splits, progress=True)]
    if cmd.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"{spec.dataset} / {spec.arch}, target 0 (metrics in %, ACC/ASR/RA on test; "
              "rate = poison rate)")
        print(_table(rows))
        print(f"total {time.perf_counter() - start:.1f} s")
    return 0
