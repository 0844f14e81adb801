"""``python -m tuner evaluate --defense NAME [--params JSON_OR_FILE]``: one configuration, every
victim, measured on test.

``--params`` takes inline JSON (``'{"lr": 0.02}'``) or the path of a JSON file holding either
a flat ``{param: value}`` object or an object with a ``"params"`` key -- so the
``best_config.json`` a report writes can be passed as is. Everything is validated (defense,
params, attacks, data flags) before any victim is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tuner._flags import DEFAULT_SEARCH_ATTACKS, add_data_flags, check_common, zoo_spec
from tuner.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--defense", required=True, help="defense to run at its paper defaults: ft, ftsam, fst, ft_init, lp, fe_tuning, "
                             "ngf or sft")
    parser.add_argument("--params", default=None, metavar="JSON_OR_FILE",
                        help="config overrides: inline JSON or a JSON file (a flat object or "
                             "one with a 'params' key, e.g. a run's best_config.json)")
    parser.add_argument("--attacks", default=DEFAULT_SEARCH_ATTACKS,
                        help=f"comma-separated attacks whose victims to defend (default {DEFAULT_SEARCH_ATTACKS})")
    parser.add_argument("--json", action="store_true", help="print only JSON on stdout")
    add_data_flags(parser)


def parse_params(text: str | None) -> dict[str, Any]:
    """Inline JSON, or a JSON file (flat, or with a "params" key); raises UsageError."""
    if text is None:
        return {}
    try:
        data = json.loads(text)
        where = "--params"
    except json.JSONDecodeError:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"--params {text!r}: neither JSON nor a readable file: expected "
                             "e.g. '{\"lr\": 0.01}' or a best_config.json") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"--params {str(path)!r}: not a JSON file ({exc})") from None
        where = f"--params {str(path)!r}"
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        data = data["params"]
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object of param -> value, got {data!r}")
    return data


def _validate(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from defenses import REGISTRY, make_config

    if args.defense not in REGISTRY:
        raise UsageError(f"unknown defense {args.defense!r}: expected one of {', '.join(REGISTRY)}")
    params = parse_params(args.params)
    cfg = make_config(args.defense, params, dataset=args.dataset)  # ConfigError -> exit 2
    check_common(args)
    if not args.attacks:
        raise UsageError("--attacks is empty: expected at least one attack, e.g. badnets")
    return params, cfg


def _victims(args: argparse.Namespace) -> tuple[list[Any], Any]:
    from zoo.data import load_splits
    from zoo.victims import get_victims

    splits = load_splits(args.dataset, data_root=args.data_root, seed=args.seed,
                         clean_ratio=args.clean_ratio, download=args.download)
    spec = zoo_spec(args)
    victims = get_victims(spec, list(args.attacks), splits=splits, device=args.device,
                          progress=not args.json)
    return victims, splits


def format_table(result: dict[str, dict[str, Any]]) -> str:
    """ACC/ASR/RA before -> after, DER and seconds per attack."""
    head = f"{'attack':<10} {'ACC':>15} {'ASR':>15} {'RA':>15} {'DER':>6} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for attack, r in result.items():
        b, a = r["before"], r["after"]
        cells = [f"{b[k]:6.1f} -> {a[k]:5.1f}" for k in ("acc", "asr", "ra")]
        flag = "  (diverged)" if r.get("diverged") else ""
        lines.append(f"{attack:<10} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                     f"{a['der']:6.1f} {r['seconds']:8.1f}{flag}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from tuner.evaluation import run_config

    params, cfg = _validate(args)
    victims, splits = _victims(args)
    result = run_config(args.defense, params, victims, splits, seed=args.seed,
                        device=args.device, split="test", precision=args.precision)
    if args.json:
        per_attack = {a: {"before": {k: r["before"][k] for k in ("acc", "asr", "ra")},
                          "after": r["after"], "seconds": r["seconds"]} for a, r in result.items()}
        out = {"defense": args.defense, "params": dataclasses.asdict(cfg), "per_attack": per_attack}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{args.defense} on {args.dataset}/{args.arch}, seed {args.seed}, test split (percent)")
    print(f"config: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}")
    print(format_table(result))
    return 0
