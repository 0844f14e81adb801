"""Trial records: what one trial did, typed, made once and read by the search, the study export
and the report (no Ray, no Optuna here).

A trial reports after every epoch (:func:`epoch_report`): the objective value(s), ``score``,
per-attack ``<attack>/acc|asr|ra|der`` on val, ``diverged`` and ``finished``. At the end of a
search each trial becomes a :class:`TrialRecord` in ``trials.json``; :meth:`TrialRecord.from_json`
reads one back, checking every field's type, so a hand-edited or foreign file is refused with
one line naming the field.

``number`` is Optuna's trial number (from 0): the one numbering of the console, the tables,
the plots, ``trials.csv`` and the study in ``study.db``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tuner import objective as O
from tuner.errors import UsageError

__all__ = ["ACC_DROP", "CPU_SECONDS", "DEVICE_SECONDS", "GPU_PEAK_MB", "METRICS", "STATES",
           "State", "TrialRecord", "acc_drop", "epoch_report", "flatten", "least_infeasible",
           "pick_best", "unflatten", "value_names"]

State = Literal["complete", "pruned", "diverged", "error", "incomplete"]
STATES: tuple[str, ...] = ("complete", "pruned", "diverged", "error", "incomplete")
METRICS = ("acc", "asr", "ra", "der")
ROBUST = "ra_asr"  # val ASR after a re-tuning attack, at a trial's last epoch (--objective robust)
SCORE = "score"  # what ASHA ranks by and the progress line shows (pareto: the mean rule)
SEED_SCORES = "seed_scores"  # --trial-seeds: each seed's score at this epoch
SCORE_STD = "score_std"  # their sample standard deviation
CPU_SECONDS = "cpu_seconds"  # CPU time of the trial's process since the trial started
DEVICE_SECONDS = "device_seconds"  # CPU seconds, or wall seconds x GPU share on CUDA
GPU_PEAK_MB = "gpu_peak_mb"  # peak CUDA memory allocated by the trial, MiB
ACC_DROP = "acc_drop"  # mean val ACC lost against the undefended victims, percentage points
MAX_TEXT = 300  # characters kept of an error line


def value_names(objective: str) -> list[str]:
    """Metric names of what Optuna optimizes (1 value, 2 for pareto)."""
    return [f"value_{i}" for i in range(len(O.directions(objective)))]


def flatten(per_attack: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{a}/{k}": float(v) for a, m in per_attack.items() for k, v in m.items()}


def unflatten(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        attack, sep, name = str(key).partition("/")
        if sep and name in (*METRICS, ROBUST) and isinstance(value, (int, float)) \
                and math.isfinite(value):
            out.setdefault(attack, {})[name] = float(value)
    return out


def acc_drop(per_attack: Mapping[str, Mapping[str, float]],
             reference: Mapping[str, float]) -> float | None:
    """Mean over the attacks of (undefended ACC - defended ACC), percentage points (what
    ``--max-acc-drop`` bounds); None when no attack has a reference."""
    drops = [float(reference[a]) - float(m["acc"]) for a, m in per_attack.items()
             if a in reference and "acc" in m]
    return sum(drops) / len(drops) if drops else None


def epoch_report(item: Mapping[str, Any], objective: str, planned: int,
                 reference_acc: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What one ``tune.report`` carries for one epoch of ``tuner.evaluation.trial_epochs``.

    A diverged victim already carries worst-case metrics (tuner.evaluation), so the values
    stay finite; anything non-finite becomes the objective's sentinel (Optuna refuses NaN).
    ``reference_acc`` (the undefended victims' val ACC per attack) adds ``acc_drop``.
    """
    diverged = bool(item["diverged"])
    per_attack = item["per_attack"]
    values = [float(v) for v in O.values(per_attack, objective)]
    score = float(O.score(per_attack, objective))
    if not all(math.isfinite(v) for v in [*values, score]):
        values, score, diverged = O.diverged_values(objective), float(O.DIVERGED_SCORE), True
    epoch = int(item["epoch"])
    out: dict[str, Any] = {"epoch": epoch, SCORE: score, **dict(zip(value_names(objective), values)),
                           **flatten(per_attack), "diverged": diverged,
                           "finished": diverged or epoch >= planned}
    if item.get("seeds"):  # --trial-seeds: the objective of each seed's metrics, and spread
        scores = [float(O.score(p, objective)) for p in item["seeds"]]
        out[SEED_SCORES] = scores
        out[SCORE_STD] = statistics.stdev(scores) if len(scores) > 1 else 0.0
    drop = acc_drop(per_attack, reference_acc or {})
    if drop is not None:
        out[ACC_DROP] = drop if math.isfinite(drop) else 100.0
    return out


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a search, as ``trials.json`` stores it."""

    number: int  #: Optuna's trial number, from 0
    trial_id: str  #: Ray Tune's id of the trial
    params: dict[str, Any]
    state: State
    epochs: int  #: epochs the trial ran
    score: float | None  #: the objective's scalar on val at its last epoch
    values: tuple[float, ...]  #: what Optuna optimized (2 numbers for pareto)
    per_attack: dict[str, dict[str, float]]  #: val metrics at its last epoch
    diverged: bool
    error: str | None  #: the last line of its error
    seconds: float  #: its wall time
    node: str | None = None
    started_at: float | None = None
    acc_drop: float | None = None  #: mean val ACC lost against no defense, at its last epoch
    seed_scores: tuple[float, ...] = ()  #: --trial-seeds: each seed's score at its last epoch
    cpu_seconds: float | None = None  #: CPU time of its process (all threads)
    device_seconds: float | None = None  #: CPU seconds, or wall x GPU share on CUDA
    gpu_peak_mb: float | None = None  #: peak CUDA memory, MiB (CUDA trials only)
    history: tuple[dict[str, Any], ...] = field(default=(), repr=False)  #: one item per epoch

    @property
    def finished(self) -> bool:
        """Ran its planned epochs without failing or diverging: comparable with each other."""
        return self.state == "complete"

    @property
    def usable(self) -> bool:
        """Has val metrics that describe its configuration (finished or stopped early)."""
        return self.state in ("complete", "pruned") and bool(self.per_attack)

    @property
    def score_std(self) -> float | None:
        """Sample std of the per-seed scores (None for one seed)."""
        return statistics.stdev(self.seed_scores) if len(self.seed_scores) > 1 else None

    @property
    def failed(self) -> bool:
        return self.state == "error"

    def feasible(self, max_acc_drop: float | None) -> bool:
        """Within the accuracy budget (always, without one); a trial with no ``acc_drop`` is
        not known to be."""
        if max_acc_drop is None:
            return True
        return self.acc_drop is not None and self.acc_drop <= max_acc_drop

    @classmethod
    def from_result(cls, *, number: int, trial_id: str, params: Mapping[str, Any],
                    status: str, last: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                    objective: str, error: str | None) -> TrialRecord:
        """A record from what Tune kept of a trial: its ``status`` (TERMINATED, ERROR, ...),
        its last reported result and the per-epoch results."""
        if status == "ERROR":
            state: State = "error"
        elif status != "TERMINATED" or SCORE not in last:
            state = "incomplete"  # not ended, or ended before its first epoch (a time budget)
        elif last.get("diverged"):
            state = "diverged"
        else:
            state = "complete" if last.get("finished", True) else "pruned"
        keep = {"epoch", SCORE, SCORE_STD, ACC_DROP, "diverged", "finished", "time_total_s"}
        rows = tuple({k: _plain(v) for k, v in row.items()
                      if k in keep or k.startswith("value_") or ("/" in k and
                                                                  not k.startswith("config/"))}
                     for row in history)
        score = _plain(last.get(SCORE))
        return cls(
            number=number, trial_id=trial_id, params={k: _plain(v) for k, v in params.items()},
            state=state, epochs=int(last.get("epoch", 0) or 0),
            score=float(score) if isinstance(score, (int, float)) else None,
            values=tuple(float(last[k]) for k in value_names(objective) if k in last),
            per_attack=unflatten(last), diverged=bool(last.get("diverged", False)),
            error=(error or "trial failed")[-MAX_TEXT:] if state == "error" else None,
            seconds=float(last.get("time_total_s", 0.0) or 0.0), node=last.get("node"),
            started_at=_plain(last.get("started_at")),
            acc_drop=_number_or_none(last.get(ACC_DROP)),
            seed_scores=tuple(float(v) for v in last.get(SEED_SCORES) or () if _is_number(v)),
            cpu_seconds=_number_or_none(last.get(CPU_SECONDS)),
            device_seconds=_number_or_none(last.get(DEVICE_SECONDS)),
            gpu_peak_mb=_number_or_none(last.get(GPU_PEAK_MB)), history=rows)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"], out["history"] = list(self.values), list(self.history)
        out["seed_scores"] = list(self.seed_scores)
        return out

    @classmethod
    def from_json(cls, raw: Any, where: str) -> TrialRecord:
        """A record read back from ``trials.json``; raises UsageError naming the bad field."""
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: expected a trial object, got {type(raw).__name__}")
        at = f"{where}: trial {str(raw.get('number', '?'))[:20]}"
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(str(k)[:40] for k in raw if k not in known)
        if extra:
            raise UsageError(f"{at}: unknown field {extra[0]!r}")
        get = _Reader(raw, at)
        state = get.text("state")
        if state not in STATES:
            raise UsageError(f"{at}: state {state[:40]!r}: expected one of {', '.join(STATES)}")
        per_attack = get.mapping("per_attack")
        for attack, metrics in per_attack.items():
            if not isinstance(metrics, dict) or not all(
                    k in (*METRICS, ROBUST) and _is_number(v) for k, v in metrics.items()):
                raise UsageError(f"{at}: per_attack.{str(attack)[:40]}: expected "
                                 f"{{metric: number}} with metrics {', '.join(METRICS)}")
        params = get.mapping("params")
        if not all(isinstance(v, (bool, int, float, str)) for v in params.values()):
            raise UsageError(f"{at}: params: expected numbers, booleans or strings")
        history = raw.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise UsageError(f"{at}: history: expected a list of objects")
        return cls(number=get.integer("number"), trial_id=get.text("trial_id"), params=params,
                   state=state, epochs=get.integer("epochs"), score=get.number("score", True),
                   values=tuple(get.numbers("values")), per_attack=per_attack,
                   diverged=get.flag("diverged"), error=get.text("error", True),
                   seconds=get.number("seconds") or 0.0, node=get.text("node", True),
                   started_at=get.number("started_at", True),
                   acc_drop=get.number("acc_drop", True),
                   seed_scores=tuple(get.numbers("seed_scores")),
                   cpu_seconds=get.number("cpu_seconds", True),
                   device_seconds=get.number("device_seconds", True),
                   gpu_peak_mb=get.number("gpu_peak_mb", True), history=tuple(history))


def _number_or_none(v: Any) -> float | None:
    v = _plain(v)
    return float(v) if _is_number(v) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Reader:
    """Typed access to one JSON object's fields, each refusal naming the field."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw, self.where = raw, where

    def _bad(self, key: str, want: str) -> UsageError:
        return UsageError(f"{self.where}: {key} = {str(self.raw.get(key))[:40]!r}: expected {want}")

    def text(self, key: str, optional: bool = False) -> Any:
        v = self.raw.get(key)
        if (v is None and optional) or (isinstance(v, str) and len(v) <= 10 * MAX_TEXT):
            return v
        raise self._bad(key, "a short string")

    def integer(self, key: str) -> int:
        v = self.raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**9:
            return v
        raise self._bad(key, "a whole number")

    def number(self, key: str, optional: bool = False) -> float | None:
        v = self.raw.get(key)
        if (v is None and optional) or _is_number(v):
            return None if v is None else float(v)
        raise self._bad(key, "a finite number")

    def numbers(self, key: str) -> list[float]:
        v = self.raw.get(key, [])
        if isinstance(v, list) and all(_is_number(x) for x in v):
            return [float(x) for x in v]
        raise self._bad(key, "a list of numbers")

    def flag(self, key: str) -> bool:
        v = self.raw.get(key, False)
        if isinstance(v, bool):
            return v
        raise self._bad(key, "true or false")

    def mapping(self, key: str) -> dict[str, Any]:
        v = self.raw.get(key, {})
        if isinstance(v, dict):
            return dict(v)
        raise self._bad(key, "an object")


# -- choosing the best ---------------------------------------------------------------------
def pick_best(records: Sequence[TrialRecord], objective: str,
              max_acc_drop: float | None = None) -> TrialRecord | None:
    """The best trial that ran all its epochs; ASHA-stopped ones (whose early values are not
    comparable) only count when no trial completed. With an accuracy budget, the best feasible
    trial; when none is feasible, the least infeasible (smallest ACC drop, then best score),
    which the report names as such."""
    def best(pool: Sequence[TrialRecord]) -> TrialRecord | None:
        rows = [{"state": r.state, "per_attack": r.per_attack, "diverged": r.diverged,
                 "error": r.error, "i": i} for i, r in enumerate(pool)]
        chosen = O.select_best(rows, objective)
        return None if chosen is None else pool[int(chosen["i"])]

    ok = [r for r in records if r.feasible(max_acc_drop)]
    chosen = best([r for r in ok if r.finished]) or best(ok)
    if chosen is not None or max_acc_drop is None:
        return chosen
    return least_infeasible(records)


def least_infeasible(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The usable, non-diverged trial with the smallest ACC drop (ties: the higher score);
    finished trials first."""
    pool = [r for r in records if r.usable and not r.diverged and r.acc_drop is not None]
    pool = [r for r in pool if r.finished] or pool
    return min(pool, key=lambda r: (float(r.acc_drop or 0.0), -(r.score or 0.0), r.number), default=None)
