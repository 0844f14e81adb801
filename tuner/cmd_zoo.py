"""``python -m tuner zoo``: build (or load) the victims and print their no-defense metrics.

    python -m tuner zoo --dataset digits --attacks none,badnets,blended,wanet,sig
    python -m tuner zoo --attacks badnets --json        # only a JSON list on stdout

Progress goes to stderr; stdout holds the table (or, with ``--json``, only the JSON list).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tuner._flags import add_data_flags, check_common, zoo_spec
from tuner.errors import UsageError

DEFAULT_ZOO_ATTACKS = "none,badnets,blended,wanet,sig"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_flags(parser)
    parser.add_argument("--attacks", default=DEFAULT_ZOO_ATTACKS,
                        help="comma-separated attacks to build or load ('none' = the clean model; "
                             f"default {DEFAULT_ZOO_ATTACKS})")
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON list of the victims' metrics on stdout")


def _row(v: Any) -> dict[str, Any]:
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
            f"{r['attack']:<10} {_rate(r['poison_rate']):>5} {r['val_acc']:7.2f} {r['val_asr']:7.2f} {r['val_ra']:7.2f}  "
            f"{r['acc']:6.2f} {r['asr']:6.2f} {r['ra']:6.2f} {r['seconds']:8.3f}  "
            f"{'built' if r['built'] else 'loaded'}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    check_common(args)
    from zoo.data import load_splits
    from zoo.victims import get_victims, prepare_attacks

    spec = zoo_spec(args)
    splits = load_splits(args.dataset, data_root=args.data_root, seed=args.seed,
                         clean_ratio=args.clean_ratio, download=args.download)
    try:
        prepare_attacks(spec, list(args.attacks), splits)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    start = time.perf_counter()
    victims = get_victims(spec, list(args.attacks), splits=splits, device=args.device, progress=True)
    rows = [_row(v) for v in victims]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"{args.dataset} / {args.arch}, target 0 (metrics in %, ACC/ASR/RA on test; "
              "rate = poison rate)")
        print(_table(rows))
        print(f"total {time.perf_counter() - start:.1f} s")
    return 0
