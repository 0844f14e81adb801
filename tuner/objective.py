"""The search objective, written out (``--objective``).

``per_attack`` maps an attack name to ``{"acc", "asr", "ra", "der"}`` in percent, measured on
the validation split after the defense ran on that attack's victim.

- ``mean`` (default): maximize  mean over attacks of (ACC - ASR).
- ``worst``: maximize  min over attacks of (ACC - ASR)  (the weakest attack decides).
- ``der``: maximize  mean over attacks of DER  (50 = no change, 100 = backdoor gone at no
  accuracy cost; BackdoorBench's defense effectiveness rate).
- ``pareto``: two objectives through Optuna's multi-objective support: maximize mean ACC,
  minimize mean ASR. Its scalar ``score`` (used to pick one best configuration on the Pareto
  front, and for ranking in reports) is the ``mean`` rule.

All scores are in percentage points. A diverged trial reports the finite sentinels
``DIVERGED_SCORE`` / ``DIVERGED_VALUES`` (Optuna refuses NaN) which rank below every real value.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "DIVERGED_SCORE",
    "DIVERGED_VALUES",
    "OBJECTIVES",
    "Objective",
    "check_objective",
    "describe",
    "diverged_values",
    "directions",
    "pareto_front",
    "score",
    "select_best",
    "values",
]

Objective = Literal["mean", "worst", "der", "pareto", "robust"]
OBJECTIVES: tuple[str, ...] = typing.get_args(Objective)

# ACC - ASR lies in [-100, 100] and DER in [0, 100]: -100 is at or below every real score.
DIVERGED_SCORE = -100.0
# pareto: (mean ACC, mean ASR) = (0, 100) is dominated by (or equal to) every real point.
DIVERGED_VALUES = (0.0, 100.0)

_DESCRIPTIONS = {
    "mean": "maximize mean over attacks of (ACC - ASR), percentage points, on val",
    "worst": "maximize min over attacks of (ACC - ASR), percentage points, on val",
    "der": "maximize mean over attacks of DER = (max(0, dASR) - max(0, dACC) + 100) / 2, "
           "percent (50 = no change), on val",
    "pareto": "two objectives on val: maximize mean ACC, minimize mean ASR (percent); the best "
              "configuration on the Pareto front is the one with the highest mean(ACC - ASR)",
    "robust": "maximize mean over attacks of ACC - max(ASR, post-RA ASR), percentage points, on "
              "val: the ASR after a re-tuning attack (zoo/sequela.py) counts, so a purification "
              "that only hides the backdoor scores low; epochs before a trial's last are scored "
              "by the mean rule",
}

# One line each, for --help.
SHORT = {
    "mean": "mean over attacks of ACC-ASR",
    "worst": "its minimum over attacks",
    "der": "mean DER",
    "pareto": "two objectives, mean ACC up and mean ASR down",
    "robust": "mean of ACC - max(ASR, ASR after a re-tuning attack); one re-tuning attack per "
              "victim at each trial's last epoch (about 2 s of CPU per victim on digits)",
}

PerAttack = Mapping[str, Mapping[str, float]]


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


def describe(objective: str) -> str:
    """The objective written out in words, for reports."""
    return _DESCRIPTIONS[check_objective(objective)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _gaps(per_attack: PerAttack) -> list[float]:
    if not per_attack:
        raise ValueError("per_attack is empty: expected at least one attack's metrics")
    return [float(m["acc"]) - float(m["asr"]) for m in per_attack.values()]


def score(per_attack: PerAttack, objective: str) -> float:
    """The scalar score, higher is better (for ``pareto``: the ``mean`` rule)."""
    check_objective(objective)
    if objective == "worst":
        return min(_gaps(per_attack))
    if objective == "der":
        _gaps(per_attack)
        return _mean([float(m["der"]) for m in per_attack.values()])
    if objective == "robust" and all("ra_asr" in m for m in per_attack.values()):
        return _mean([float(m["acc"]) - max(float(m["asr"]), float(m["ra_asr"]))
                      for m in per_attack.values()])
    return _mean(_gaps(per_attack))


def values(per_attack: PerAttack, objective: str) -> list[float]:
    """What Optuna optimizes: one number, or ``[mean ACC, mean ASR]`` for ``pareto``."""
    if check_objective(objective) == "pareto":
        _gaps(per_attack)
        accs = [float(m["acc"]) for m in per_attack.values()]
        asrs = [float(m["asr"]) for m in per_attack.values()]
        return [_mean(accs), _mean(asrs)]
    return [score(per_attack, objective)]


def diverged_values(objective: str) -> list[float]:
    """The finite sentinel values a diverged trial reports."""
    if check_objective(objective) == "pareto":
        return list(DIVERGED_VALUES)
    return [DIVERGED_SCORE]


def directions(objective: str) -> list[str]:
    """Optuna study directions matching :func:`values`."""
    if check_objective(objective) == "pareto":
        return ["maximize", "minimize"]
    return ["maximize"]


def pareto_front(points: Sequence[Sequence[float]],
                 directions_: Sequence[str] = ("maximize", "minimize")) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept)."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions_]
    keyed = [[s * float(v) for s, v in zip(signs, p, strict=True)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(keyed)
            if not any(dominates(q, p) for j, q in enumerate(keyed) if j != i)]


def _usable(trial: Mapping[str, Any]) -> bool:
    state = str(trial.get("state", "")).upper()
    return (state not in ("ERROR", "FAIL", "FAILED", "RUNNING", "PENDING", "INCOMPLETE")
            and not trial.get("error") and not trial.get("diverged")
            and bool(trial.get("per_attack")))


def select_best(trials: Sequence[Mapping[str, Any]], objective: str) -> Mapping[str, Any] | None:
    """The best finished, non-diverged trial (``trials.json`` rows), or None if there is none.

    Ties go to the earlier trial. For ``pareto`` the choice is restricted to the Pareto front
    of (mean ACC, mean ASR) and made there by the ``mean`` rule.
    """
    pool = [t for t in trials if _usable(t)]
    if not pool:
        return None
    if check_objective(objective) == "pareto":
        front = pareto_front([values(t["per_attack"], "pareto") for t in pool])
        pool = [pool[i] for i in front]
    best = pool[0]
    for t in pool[1:]:
        if score(t["per_attack"], objective) > score(best["per_attack"], objective):
            best = t
    return best
