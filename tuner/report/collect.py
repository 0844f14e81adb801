"""Collect: a run folder's raw files, read and checked, as typed :class:`ReportData`.

Raw files (written by the search): ``spec.json`` (the spec and its provenance),
``space.json``, ``trials.json``, ``final.json`` (optional: a run stopped before the final
evaluation still renders, without test numbers) and ``timing.json`` (optional). Every field is
type-checked as it is read, so a damaged or foreign run folder is refused with one line naming
the file and the field (``tuner.errors.UsageError``), never a traceback.

Conventions: metrics are percent; "mean ± std" is over the final seeds with the sample standard
deviation (ddof 1; 0 for a single seed); the test score of a configuration is the objective
computed per seed over the *search* attacks (so it compares with the val score), then averaged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner import objective as O
from tuner._io import clip, clip_text, read_json
from tuner.errors import UsageError
from tuner.records import METRICS, TrialRecord
from tuner.spaces import Space, space_from_json
from tuner.spec import ExperimentSpec
from tuner.study import param_importances, study_from_records

__all__ = ["ReportData", "Result", "collect"]


@dataclass(frozen=True)
class Result:
    """A configuration's final evaluation: per-attack mean and std over seeds, on test."""

    params: dict[str, Any]
    val_score: float | None
    trial: int | None  #: the trial number it came from (None for the paper default)
    seeds: int
    score: float | None
    score_std: float | None
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    per_seed: list[dict[str, dict[str, float]]] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class ReportData:
    run_dir: Path
    spec: ExperimentSpec
    provenance: dict[str, Any]
    space: Space | None
    trials: list[TrialRecord]
    best: Result | None
    default: Result | None
    no_defense: dict[str, dict[str, float]]
    poison_rates: dict[str, float | None]
    timing: dict[str, float]
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def attacks(self) -> list[str]:
        return list(self.spec.attacks)

    @property
    def holdout(self) -> list[str]:
        return list(self.spec.holdout_attacks)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.trials)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} = {clip(value, 40)}: expected a finite number")
    return float(value)


def _metrics(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected an object of metrics")
    return {k: _number(v, f"{where}.{k}") for k, v in raw.items() if k in METRICS}


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _result(raw: Any, attacks: list[str], objective: str, where: str) -> Result | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("seeds", []), list):
        raise UsageError(f"{where}: expected an object with a 'seeds' list")
    seeds: list[dict[str, dict[str, float]]] = []
    for i, seed in enumerate(raw.get("seeds", [])):
        if not isinstance(seed, dict):
            raise UsageError(f"{where}.seeds[{i}]: expected an object of attacks")
        seeds.append({str(a): _metrics(m.get("after") if isinstance(m, dict) else m,
                                       f"{where}.seeds[{i}].{clip(a, 30)}.after")
                      for a, m in seed.items()})
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for a in sorted({a for s in seeds for a in s}):
        for k in METRICS:
            vals = [s[a][k] for s in seeds if a in s and k in s[a]]
            if vals:
                mean.setdefault(a, {})[k], std.setdefault(a, {})[k] = _stats(vals)
    scores = [O.score({a: s[a] for a in attacks if a in s} or s, objective) for s in seeds if s]
    score, score_std = _stats(scores) if scores else (None, None)
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{where}.params: expected an object")
    val = raw.get("val_score")
    trial = raw.get("trial")
    return Result(dict(params), None if val is None else _number(val, f"{where}.val_score"),
                  trial if isinstance(trial, int) and not isinstance(trial, bool) else None,
                  len(seeds), score, score_std, mean, std, seeds)


def _no_defense(final: dict[str, Any], where: str) -> dict[str, dict[str, float]]:
    raw = (final.get("no_defense") or {}).get("per_attack") or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{where}.no_defense.per_attack: expected an object")
    return {str(a): {k: v for k, v in _metrics(m, f"{where}.no_defense.{clip(a, 30)}").items()
                     if k != "der"} for a, m in raw.items()}


def _best_from_trials(trials: list[TrialRecord], objective: str) -> Result | None:
    """The best trial's val numbers, for a run stopped before its final evaluation."""
    rows = [{"state": t.state, "per_attack": t.per_attack, "i": i}
            for i, t in enumerate(trials) if t.usable]
    best = O.select_best(rows, objective)
    if best is None:
        return None
    t = trials[int(best["i"])]
    return Result(dict(t.params), t.score, t.number, 0, None, None, {}, {})


def collect(run_dir: str | Path) -> ReportData:
    """Read a run directory's raw files into :class:`ReportData` (raises UsageError)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory: expected a run directory written by "
                         "'python -m tuner'")

    def optional(name: str) -> Any:
        return read_json(root / name) if (root / name).exists() else None

    for name in ("spec.json", "trials.json"):
        if not (root / name).exists():
            raise UsageError(f"{root / name}: missing: expected a run directory written by "
                             "'python -m tuner' (holding spec.json and trials.json)")
    raw_spec = read_json(root / "spec.json")
    spec = ExperimentSpec.from_dict(raw_spec, where=str(root / "spec.json"))
    prov = raw_spec.get("provenance") or {}
    if not isinstance(prov, dict):
        raise UsageError(f"{root / 'spec.json'}: provenance: expected an object")
    raw_trials = read_json(root / "trials.json")
    if not isinstance(raw_trials, list):
        raise UsageError(f"{root / 'trials.json'}: expected a list of trials")
    trials = [TrialRecord.from_json(t, str(root / "trials.json")) for t in raw_trials]
    raw_space = optional("space.json")
    try:
        space = space_from_json(raw_space) if raw_space is not None else None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"{root / 'space.json'}: not a search space ({clip_text(exc, 80)})") from None
    final = optional("final.json") or {}
    where = str(root / "final.json")
    if not isinstance(final, dict):
        raise UsageError(f"{where}: expected an object")
    attacks, objective = list(spec.attacks), spec.objective
    best = _result(final.get("best"), attacks, objective, f"{where}: best") or \
        _best_from_trials(trials, objective)
    rates = final.get("poison_rates") or {}
    timing = optional("timing.json") or {}
    if not isinstance(rates, dict) or not isinstance(timing, dict):
        raise UsageError(f"{where}: poison_rates and timing.json: expected objects")
    importances: dict[str, float] = {}
    note = "not computed: no search space (space.json)"
    if space is not None:
        study = study_from_records(trials, space.distributions, objective)
        importances, note = param_importances(study)
    return ReportData(
        root, spec, prov, space, trials, best,
        _result(final.get("default"), attacks, objective, f"{where}: default"),
        _no_defense(final, where),
        {str(a): (r if isinstance(r, (int, float)) else None) for a, r in rates.items()},
        {k: float(v) for k, v in timing.items() if isinstance(v, (int, float))},
        importances, note)
