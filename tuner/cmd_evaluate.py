"""``python -m tuner evaluate [--defense NAME] [--params JSON_OR_FILE]``: one configuration on
every victim, measured on test, over ``--seeds`` defense seeds.

``--params`` takes inline JSON (``'{"lr": 0.02}'``) or the path of a JSON file holding either
a flat ``{param: value}`` object or an object with a ``"params"`` key -- so the
``best_config.json`` a report writes can be passed as is, and then names the defense.
``--seed`` chooses the split and the victims; the defense runs with seeds ``--defense-seed``
(default: ``--seed``) up to ``+ --seeds - 1``, as a search's final evaluation does, so a report's
test numbers can be reproduced. Everything is validated before any victim is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defenses import REGISTRY, make_config
from tuner import flags
from tuner.errors import UsageError
from tuner.evaluation import anchors, mia_before, run_config
from tuner.spec import victims_default
from zoo.victims import ZooSpec, check_zoo_dir, get_victims

MAX_PARAMS_BYTES = 1 << 20  # a best_config.json is a few hundred bytes


@dataclass(frozen=True)
class EvaluateCommand:
    defense: str | None = field(default=None, metadata={
        "help": "defense to run", "choices": tuple(REGISTRY),
        "default_text": "the 'defense' of the --params file"})
    params: str | None = field(default=None, metadata={
        "help": "config overrides over the paper defaults: inline JSON or a JSON file (a flat "
                "object, or one with a 'params' key such as a run's best_config.json)",
        "metavar": "JSON_OR_FILE"})
    seeds: int = field(default=1, metadata={
        "help": "defense seeds to run, from --defense-seed on; the summary gives mean ± std"})
    defense_seed: int | None = field(default=None, metadata={
        "help": "first seed of the defense's own randomness (batch order, head init)",
        "default_text": "--seed, as a search's final evaluation"})
    sequela: bool = field(default=False, metadata={
        "help": "also measure whether the purification holds: ASR after a re-tuning attack and "
                "the membership-inference AUC change (zoo/sequela.py), with the re-tuning "
                "attack's anchors (the clean 'none' victim, built if missing, and the undefended "
                "victim); about 2 s of CPU per victim and seed on digits"})
    zoo: ZooSpec = field(default_factory=ZooSpec, metadata={"title": "data and victims"})
    json: bool = field(default=False, metadata={"help": "print only JSON on stdout"})

    def __post_init__(self) -> None:
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UsageError(f"--seeds {self.seeds!r}: expected a whole number >= 1")
        if self.defense_seed is not None and not 0 <= self.defense_seed <= 2**31 - 1:
            raise UsageError(f"--defense-seed {self.defense_seed}: expected 0..{2**31 - 1}")

    @property
    def first_seed(self) -> int:
        return self.zoo.seed if self.defense_seed is None else self.defense_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, EvaluateCommand)


def parse_params(text: str | None) -> tuple[dict[str, Any], str | None]:
    """``(params, defense named by the file or None)`` from inline JSON or a JSON file (flat,
    or with a "params" key); raises UsageError."""
    if text is None:
        return {}, None
    try:
        data = json.loads(text)
        where = "--params"
    except json.JSONDecodeError:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"--params {text[:200]!r}: neither JSON nor a readable file: "
                             "expected e.g. '{\"lr\": 0.01}' or a best_config.json") from None
        if path.stat().st_size > MAX_PARAMS_BYTES:
            raise UsageError(f"--params {str(path)!r}: larger than {MAX_PARAMS_BYTES} bytes: "
                             "expected a small JSON file such as best_config.json") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UsageError(f"--params {str(path)!r}: not a JSON file ({exc})") from None
        where = f"--params {str(path)!r}"
    defense = None
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        defense = data.get("defense")
        data = data["params"]
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a JSON object of param -> value, "
                         f"got {type(data).__name__}")
    if defense is not None and defense not in REGISTRY:
        raise UsageError(f"{where}: defense {str(defense)[:50]!r}: expected one of "
                         f"{', '.join(REGISTRY)}")
    return data, defense


def resolve(cmd: EvaluateCommand) -> tuple[str, dict[str, Any], Any]:
    """(defense, params, config) with every check done; raises UsageError or ConfigError."""
    params, named = parse_params(cmd.params)
    if cmd.defense is not None and named is not None and named != cmd.defense:
        raise UsageError(f"--defense {cmd.defense} but --params is a {named} configuration: "
                         "expected the same defense (or leave --defense out)")
    defense = cmd.defense or named
    if defense is None:
        raise UsageError("--defense is required unless --params names one "
                         "(e.g. a run's best_config.json)")
    return defense, params, make_config(defense, params, dataset=cmd.zoo.dataset)


def format_table(result: dict[str, dict[str, Any]]) -> str:
    """ACC/ASR/RA before -> after, DER and seconds per attack (one seed)."""
    head = f"{'attack':<10} {'ACC':>15} {'ASR':>15} {'RA':>15} {'DER':>6} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for attack, r in result.items():
        b, a = r["before"], r["after"]
        cells = [f"{b[k]:6.1f} -> {a[k]:5.1f}" for k in ("acc", "asr", "ra")]
        flag = "  (diverged)" if r.get("diverged") else ""
        lines.append(f"{attack:<10} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                     f"{a['der']:6.1f} {r['seconds']:8.1f}{flag}")
    return "\n".join(lines)


def summary(runs: list[dict[str, dict[str, Any]]]) -> dict[str, tuple[float, float]]:
    """Mean ± std over seeds of the per-seed mean (over attacks) ACC and ASR, before and after."""
    def stat(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def per_seed(part: str, key: str) -> list[float]:
        return [statistics.fmean(r[part][key] for r in run.values()) for run in runs]

    return {f"{part} {key}": stat(per_seed(part, key))
            for part in ("before", "after") for key in ("acc", "asr")}


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(EvaluateCommand, args)
    cmd = dataclasses.replace(cmd, zoo=victims_default(cmd.zoo, args))
    defense, params, cfg = resolve(cmd)
    check_zoo_dir(cmd.zoo)
    splits = cmd.zoo.load_splits()
    victims = get_victims(cmd.zoo, splits=splits, progress=not cmd.json)
    seeds = list(range(cmd.first_seed, cmd.first_seed + cmd.seeds))
    device, precision = cmd.zoo.device, cmd.zoo.precision
    mia = mia_before(victims, splits, seed=cmd.first_seed, device=device,
                     precision=precision) if cmd.sequela else None
    anchor: dict[str, Any] = {}
    if cmd.sequela and any(v.retunable for v in victims):
        (clean,) = get_victims(dataclasses.replace(cmd.zoo, attacks=("none",)), splits=splits,
                               progress=not cmd.json)
        anchor = anchors(victims, clean, splits, seed=cmd.first_seed,
                         device=device, precision=precision)
    runs = []
    for seed in seeds:
        runs.append(run_config(defense, params, victims, splits, seed=seed, device=device,
                               split="test", precision=precision, sequela=mia))
        if not cmd.json:
            print(f"{defense} on {cmd.zoo.dataset}/{cmd.zoo.arch}, victims from seed "
                  f"{cmd.zoo.seed}, defense seed {seed}, test split (percent)")
            print(format_table(runs[-1]))
    stats = summary(runs)
    if cmd.json:
        keys = ("before", "after", "seconds", "diverged", "sequela")
        out = {"defense": defense, "params": dataclasses.asdict(cfg), "victim_seed": cmd.zoo.seed,
               "defense_seeds": seeds, "summary": {k: {"mean": m, "std": s}
                                                   for k, (m, s) in stats.items()},
               "runs": [{a: {k: r[k] for k in keys if k in r} for a, r in run.items()}
                        for run in runs], "sequela_anchors": anchor or None}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"config: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}")
    (acc0, _), (asr0, _) = stats["before acc"], stats["before asr"]
    (acc, acc_sd), (asr, asr_sd) = stats["after acc"], stats["after asr"]
    print(f"summary over {len(victims)} attacks and {len(seeds)} seed(s): mean ACC "
          f"{acc0:.1f} -> {acc:.1f} ± {acc_sd:.1f}, mean ASR {asr0:.1f} -> {asr:.1f} ± {asr_sd:.1f}")
    if cmd.sequela:
        print(sequela_table(runs, anchor))
    return 0


def sequela_table(runs: list[dict[str, dict[str, Any]]], anchor: dict[str, Any]) -> str:
    """Per attack: ASR after a re-tuning attack (defended, clean model, undefended victim) and
    the membership-inference AUC change, means over seeds."""
    head = (f"{'attack':<10} {'ASR after re-tuning':>20} {'clean model':>12} "
            f"{'undefended':>11} {'membership AUC change':>22}")
    lines = ["does the purification hold? (lower re-tuned ASR is better; AUC change near 0)",
             head, "-" * len(head)]
    for a in runs[0]:
        rows = [run[a]["sequela"] for run in runs if "sequela" in run[a]]
        if not rows:
            lines.append(f"{a:<10} {'(diverged)':>20}")
            continue
        ra = statistics.fmean(r["ra_asr"] for r in rows)
        change = statistics.fmean(r["mia_change"] for r in rows)
        an = anchor.get(a, {})
        lines.append(f"{a:<10} {ra:20.1f} {an.get('clean_ra_asr', float('nan')):12.1f} "
                     f"{an.get('undefended_ra_asr', float('nan')):11.1f} {change:+22.3f}")
    return "\n".join(lines)
