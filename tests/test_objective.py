"""The objective with Optuna's in-memory ask/tell (no Ray)."""

from __future__ import annotations

import math

import optuna
import pytest

from tuner.objective import (
    DIVERGED_SCORE,
    OBJECTIVES,
    directions,
    diverged_values,
    pareto_front,
    score,
    select_best,
    values,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

PER_ATTACK = {
    "badnets": {"acc": 90.0, "asr": 10.0, "ra": 80.0, "der": 90.0},
    "blended": {"acc": 80.0, "asr": 60.0, "ra": 30.0, "der": 60.0},
}


def test_mean_worst_der_pareto_by_hand() -> None:
    assert score(PER_ATTACK, "mean") == pytest.approx((80 + 20) / 2)
    assert score(PER_ATTACK, "worst") == pytest.approx(20.0)
    assert score(PER_ATTACK, "der") == pytest.approx(75.0)
    assert values(PER_ATTACK, "pareto") == pytest.approx([85.0, 35.0])
    assert score(PER_ATTACK, "pareto") == score(PER_ATTACK, "mean")


def test_unknown_objective_and_empty_metrics_raise() -> None:
    with pytest.raises(ValueError, match="unknown objective 'max'"):
        score(PER_ATTACK, "max")
    with pytest.raises(ValueError, match="per_attack is empty"):
        values({}, "pareto")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_study_with_directions_accepts_values(objective: str) -> None:
    study = optuna.create_study(directions=directions(objective))
    trial = study.ask()
    study.tell(trial, values(PER_ATTACK, objective))
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert len(study.trials[0].values) == len(directions(objective))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_diverged_trial_is_finite_and_ranks_worst(objective: str) -> None:
    study = optuna.create_study(directions=directions(objective))
    worst_real = {a: {"acc": 0.0, "asr": 100.0, "ra": 0.0, "der": 0.0} for a in PER_ATTACK}
    for v in (values(PER_ATTACK, objective), diverged_values(objective), values(worst_real, objective)):
        study.tell(study.ask(), v)
    sentinel = study.trials[1].values
    assert all(math.isfinite(x) for x in sentinel)
    if objective == "pareto":
        assert [t.number for t in study.best_trials] == [0]
    else:
        assert study.best_trial.number == 0
        assert sentinel[0] == DIVERGED_SCORE <= study.trials[2].values[0]


def test_pareto_front_on_hand_made_points() -> None:
    # (acc up, asr down): 0 and 2 trade off, 1 is dominated by 0, 3 duplicates 2.
    points = [(90, 20), (85, 30), (70, 5), (70, 5), (60, 50)]
    assert pareto_front(points) == [0, 2, 3]
    assert pareto_front([(1, 1)]) == [0]
    assert pareto_front([(1, 2), (2, 1)], ("maximize", "maximize")) == [0, 1]


def _row(i: int, acc: float, asr: float, **kw) -> dict:
    row = {"trial_id": str(i), "params": {"lr": i}, "state": "COMPLETE", "diverged": False,
           "error": None, "per_attack": {"a": {"acc": acc, "asr": asr, "ra": 0.0, "der": 50.0}}}
    row.update(kw)
    return row


def test_select_best_ignores_failed_and_diverged_trials() -> None:
    trials = [
        _row(0, 80, 30),
        _row(1, 99, 0, state="ERROR", error="RuntimeError: boom"),
        _row(2, 99, 0, diverged=True),
        _row(3, 85, 20),
        _row(4, 99, 1, per_attack={}),
    ]
    assert select_best(trials, "mean")["trial_id"] == "3"
    assert select_best(trials[1:3], "mean") is None


def test_select_best_pareto_picks_mean_rule_on_front() -> None:
    trials = [_row(0, 95, 50), _row(1, 90, 10), _row(2, 70, 2), _row(3, 89, 11)]
    assert select_best(trials, "pareto")["trial_id"] == "1"
