"""The Optuna side of a search, with Optuna's public API only (no Ray here).

- :class:`AskTell`: the sampler's bookkeeping during a search, through Optuna's ask-and-tell
  interface. ``tuner.trainable`` wraps it in a Ray Tune ``Searcher``. The paper default is
  enqueued as trial 0. A trial that ASHA stopped early is told PRUNED (Optuna then ranks it by
  its last intermediate value), so TPE does not learn "short trials are bad configurations";
  a diverged trial is told COMPLETE with the objective's finite sentinel (so TPE learns to
  avoid the region); a failed trial FAIL.
- ``--max-acc-drop``: Optuna's own constrained optimization. Each trial told to the study
  carries the constraint ``acc_drop`` = (mean val ACC lost) - budget, set with the public
  ``Trial.set_constraint`` (Optuna stores it in the trial's system attrs as
  ``constraints:acc_drop``; ``FrozenTrial.constraints`` reads it back): feasible when <= 0.
  TPE (and NSGA-II) then model the feasible region, and ``study.best_trial`` is the best
  feasible trial. Optuna 5 deprecates the samplers' ``constraints_func`` (FutureWarning,
  removal planned for 7.0) in favour of ``set_constraint``; both reach the same system attr.
- :func:`study_from_records`: the finished search as an Optuna study, from ``trials.json``;
  the same study is written to ``study.db`` (optuna-dashboard) and feeds the report's
  parameter importances, so both see the same trials in the same states.

>>> from optuna.distributions import FloatDistribution
>>> at = AskTell({"lr": FloatDistribution(1e-3, 1e-1, log=True)}, "mean", {"lr": 0.01})
>>> at.ask("t0")
(0, {'lr': 0.01})
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState, create_trial

from tuner.objective import directions
from tuner.records import ACC_DROP, TrialRecord, value_names

__all__ = ["CONSTRAINT", "AskTell", "export", "param_importances", "sampler_settings", "study_from_records"]


CONSTRAINT = ACC_DROP  # the constraint's name in Optuna (FrozenTrial.constraints)


def constraint_value(acc_drop: float | None, max_acc_drop: float | None) -> float | None:
    """Optuna's constraint value for a trial: feasible when <= 0; None without a budget or a
    measured drop."""
    if max_acc_drop is None or acc_drop is None:
        return None
    return float(acc_drop) - float(max_acc_drop)


def sampler_settings(seed: int, num_samples: int) -> dict[str, Any]:
    """The sampler a search builds, as data (``spec.json`` records it): seeded multivariate
    TPE whose random start-up takes a third of the budget, between 2 and 10 trials."""
    return {"class": "TPESampler", "seed": seed, "multivariate": True,
            "n_startup_trials": max(2, min(10, num_samples // 3))}


def build_sampler(settings: Mapping[str, Any]) -> optuna.samplers.BaseSampler:
    kwargs = {k: v for k, v in settings.items() if k != "class"}
    return getattr(optuna.samplers, str(settings["class"]))(**kwargs)


class AskTell:
    """One search's Optuna study (in memory), driven by ask and tell."""

    def __init__(self, space: Mapping[str, BaseDistribution], objective: str,
                 default: Mapping[str, Any], sampler: Mapping[str, Any] | None = None, *,
                 max_acc_drop: float | None = None) -> None:
        self.space = dict(space)
        self.max_acc_drop = max_acc_drop
        self.names = value_names(objective)
        quiet = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
        try:
            self.study = optuna.create_study(
                directions=cast(Any, directions(objective)),
                sampler=build_sampler(sampler or sampler_settings(0, 16)))
        finally:
            optuna.logging.set_verbosity(quiet)
        self.study.enqueue_trial(dict(default))  # the paper default is trial 0
        self.trials: dict[str, optuna.Trial] = {}

    def ask(self, trial_id: str) -> tuple[int, dict[str, Any]]:
        """A new configuration for Tune's ``trial_id``: (Optuna trial number, params)."""
        trial = self.study.ask(fixed_distributions=self.space)
        self.trials[trial_id] = trial
        return trial.number, dict(trial.params)

    def report(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """An epoch's value, for pruned trials' ranking (single objective only)."""
        trial = self.trials.get(trial_id)
        if trial is not None and len(self.names) == 1 and self.names[0] in result:
            trial.report(float(result[self.names[0]]), int(result.get("epoch", 0)))

    def tell(self, trial_id: str, result: Mapping[str, Any] | None, error: bool) -> None:
        """The trial's end: FAIL on error, PRUNED when stopped early, else its values."""
        trial = self.trials.pop(trial_id, None)
        if trial is None:
            return
        c = constraint_value((result or {}).get(ACC_DROP), self.max_acc_drop)
        if c is not None and not error:  # before tell: the sampler reads it in after_trial
            trial.set_constraint(CONSTRAINT, c)
        if error or not result or any(k not in result for k in self.names):
            self.study.tell(trial, state=TrialState.FAIL)
        elif not result.get("finished", True):
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, [float(result[k]) for k in self.names])


# -- the finished study ---------------------------------------------------------------------
def _contains(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and dist.low <= value <= dist.high  # type: ignore[attr-defined]


def _widened(dist: BaseDistribution, value: Any) -> BaseDistribution | None:
    """``dist`` widened to hold ``value`` (the paper default may lie outside a narrowed range);
    None where it cannot be (a categorical without it, a stepped int range)."""
    if _contains(dist, value):
        return dist
    if isinstance(dist, CategoricalDistribution) or getattr(dist, "step", None) not in (None, 1):
        return None
    low, high = min(dist.low, value), max(dist.high, value)  # type: ignore[attr-defined]
    return type(dist)(low=low, high=high, log=dist.log)  # type: ignore[attr-defined,call-arg]


def study_from_records(records: Sequence[TrialRecord], space: Mapping[str, BaseDistribution],
                       objective: str, *, name: str = "search", storage: str | None = None,
                       max_acc_drop: float | None = None) -> optuna.Study:
    """The search's trials as an Optuna study, numbered as in the search.

    States: complete -> COMPLETE (its values), pruned -> PRUNED (with its per-epoch values as
    intermediate values; multi-objective studies keep none), diverged -> COMPLETE with the
    sentinel values it reported, error -> FAIL. Incomplete trials (the run was stopped) are
    left out. ``storage`` (an SQLite URL) writes the study there, as ``study.db``.
    ``max_acc_drop``: each trial carries its constraint (see the module docstring), so
    optuna-dashboard shows which were feasible.
    """
    quiet = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=name,
                                    directions=cast(Any, directions(objective)))
        multi = len(value_names(objective)) > 1
        for r in sorted(records, key=lambda r: r.number):
            dists = {k: _widened(space[k], v) for k, v in r.params.items() if k in space}
            if r.state == "incomplete" or any(d is None for d in dists.values()):
                continue
            state = {"error": TrialState.FAIL, "pruned": TrialState.PRUNED}.get(
                r.state, TrialState.COMPLETE)
            values: list[float] | None = list(r.values) or None
            if state != TrialState.COMPLETE or values is None:
                values = None
                state = TrialState.FAIL if state == TrialState.COMPLETE else state
            c = constraint_value(r.acc_drop, max_acc_drop) if state != TrialState.FAIL else None
            history = {int(h["epoch"]): float(h["value_0"]) for h in r.history
                       if isinstance(h.get("value_0"), (int, float))
                       and isinstance(h.get("epoch"), int)}
            study.add_trial(create_trial(
                state=state, values=values, params={k: r.params[k] for k in dists},
                distributions=dists,  # type: ignore[arg-type]
                intermediate_values=None if multi else history,
                constraints=None if c is None else {CONSTRAINT: c},
                user_attrs={"trial_id": r.trial_id, "state": r.state, "epochs": r.epochs}))
        return study
    finally:
        optuna.logging.set_verbosity(quiet)


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Importances of the params for the first objective, as optuna-dashboard computes them on
    the same study: ``optuna.importance.get_param_importances`` with PED-ANOVA (Watanabe et
    al. 2023) over the COMPLETE trials, the target negated when maximized (PED-ANOVA ranks low
    values as good); ``(importances, why missing)``."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return {}, "not computed: needs at least 2 trials that ran all their epochs"
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PED-ANOVA is experimental; the target is negated
            imps = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                target=lambda t: sign * t.values[0])
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, f"not computed: {exc}"
    clean = {k: float(v) for k, v in imps.items() if math.isfinite(v)}
    return clean, "" if clean else "not computed: no parameter varied"


def export(path: Path, records: Sequence[TrialRecord], space: Mapping[str, BaseDistribution],
           objective: str, name: str, *, max_acc_drop: float | None = None) -> int:
    """Write ``study.db`` (replacing an old one); returns the number of trials in it."""
    path.unlink(missing_ok=True)
    study = study_from_records(records, space, objective, name=name,
                               storage=f"sqlite:///{path}", max_acc_drop=max_acc_drop)
    return len(study.trials)
