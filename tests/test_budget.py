"""The accuracy budget (--max-acc-drop): an Optuna constraint, the best feasible trial, and a
report that says when no trial met it. No Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tuner.records import TrialRecord, epoch_report, pick_best
from tuner.report import collect, write_report
from tuner.spaces import load_space
from tuner.spec import ExperimentSpec
from tuner.study import AskTell, study_from_records
from zoo.victims import ZooSpec


def _pa(acc: float, asr: float) -> dict[str, dict[str, float]]:
    return {"badnets": {"acc": acc, "asr": asr, "ra": 50.0, "der": 60.0}}


def _record(number: int, score: float, acc_drop: float | None, state: str = "complete",
            **params: Any) -> TrialRecord:
    return TrialRecord(number=number, trial_id=f"t{number}", params={"lr": 0.01, **params},
                       state=state, epochs=1, score=score, values=(score,),
                       per_attack=_pa(90.0, 90.0 - score), diverged=False, error=None,
                       seconds=1.0, acc_drop=acc_drop)


def test_epoch_report_measures_the_acc_drop_against_the_undefended_victims() -> None:
    item = {"epoch": 1, "diverged": False, "per_attack": {
        "badnets": {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0},
        "blended": {"acc": 80.0, "asr": 5.0, "ra": 80.0, "der": 90.0}}}
    m = epoch_report(item, "mean", 1, {"badnets": 95.0, "blended": 94.0})
    assert m["acc_drop"] == pytest.approx((5.0 + 14.0) / 2)
    assert "acc_drop" not in epoch_report(item, "mean", 1)


def test_constraint_reaches_optuna_and_best_trial_is_the_feasible_one() -> None:
    space = load_space("ft", dataset="digits")
    at = AskTell(space.distributions, "mean", space.default, max_acc_drop=2.0)
    for tid in ("a", "b", "c"):
        at.ask(tid)
    at.tell("a", {"value_0": 50.0, "acc_drop": 1.0, "finished": True}, error=False)
    at.tell("b", {"value_0": 90.0, "acc_drop": 5.0, "finished": True}, error=False)
    at.tell("c", {"value_0": 95.0, "acc_drop": 0.5, "finished": False}, error=False)  # pruned
    trials = at.study.trials
    assert [t.constraints for t in trials] == [{"acc_drop": -1.0}, {"acc_drop": 3.0},
                                               {"acc_drop": -1.5}]
    assert trials[1].system_attrs["constraints:acc_drop"] == 3.0  # where Optuna stores it
    assert at.study.best_trial.number == 0  # trial 1 scores higher but is infeasible


def test_without_a_budget_no_trial_carries_a_constraint() -> None:
    space = load_space("ft", dataset="digits")
    at = AskTell(space.distributions, "mean", space.default)
    at.ask("a")
    at.tell("a", {"value_0": 50.0, "acc_drop": 9.0}, error=False)
    assert at.study.trials[0].constraints == {}


def test_study_export_carries_the_constraints() -> None:
    space = load_space("ft", dataset="digits")
    records = [_record(0, 50.0, 1.0), _record(1, 80.0, 4.0, lr=0.02)]
    study = study_from_records(records, space.distributions, "mean", max_acc_drop=2.0)
    assert [t.constraints for t in study.trials] == [{"acc_drop": -1.0}, {"acc_drop": 2.0}]
    assert study.best_trial.number == 0


def test_best_is_the_best_feasible_else_the_least_infeasible() -> None:
    records = [_record(0, 50.0, 1.0), _record(1, 80.0, 4.0), _record(2, 70.0, 3.0)]
    assert pick_best(records, "mean").number == 1  # no budget: the best score
    assert pick_best(records, "mean", 2.0).number == 0
    assert pick_best(records, "mean", 3.0).number == 2
    assert pick_best(records[1:], "mean", 2.0).number == 2  # none feasible: smallest drop


@pytest.fixture()
def infeasible_run(tmp_path: Path) -> Path:
    spec = ExperimentSpec(defense="ft", name="run", output=tmp_path, num_samples=2,
                          max_acc_drop=1.0, zoo=ZooSpec(attacks=("badnets",))).to_dict()
    trials = [_record(0, 40.0, 6.0).to_json(), _record(1, 60.0, 3.5, lr=0.02).to_json()]
    run = {"victim_seed": 0, "defense_seed": 0, "per_attack": {"badnets": {
        "before": {"acc": 95.0, "asr": 99.0, "ra": 1.0}, "after": _pa(91.0, 30.0)["badnets"]}}}
    final = {"format": 2, "best": {"params": {"lr": 0.02}, "val_score": 60.0, "trial": 1,
                                   "runs": [run]},
             "default": {"params": {"lr": 0.01}, "val_score": 40.0, "runs": [run]},
             "no_defense": {"runs": [{"victim_seed": 0, "per_attack": {
                 "badnets": {"acc": 95.0, "asr": 99.0, "ra": 1.0}}}]}}
    for name, obj in (("spec.json", spec), ("trials.json", trials), ("final.json", final)):
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def test_all_infeasible_search_says_so_and_shows_the_least_infeasible(
        infeasible_run: Path) -> None:
    d = collect(infeasible_run)
    assert d.budget is not None and (d.budget.feasible, d.budget.measured) == (0, 2)
    assert not d.budget.best_feasible and d.budget.best_trial == 1
    write_report(infeasible_run)
    md = (infeasible_run / "report.md").read_text()
    assert "NO TRIAL MET THE BUDGET" in md and "least infeasible, trial 1" in md
    assert "0 of 2 trials were feasible" in md
    s = json.loads((infeasible_run / "summary.json").read_text())
    assert s["budget"]["max_acc_drop"] == 1.0 and s["budget"]["best_feasible"] is False


def test_a_feasible_best_is_reported_as_such(infeasible_run: Path) -> None:
    d = collect(infeasible_run, max_acc_drop=4.0)
    assert d.budget is not None and d.budget.best_feasible and d.budget.feasible == 1


@pytest.mark.parametrize("value", ["-1", "101", "nan"])
def test_bad_budget_is_one_line_exit_2_before_anything_starts(tmp_path: Path, capsys,
                                                              value: str) -> None:
    from tuner.cli import main

    out = tmp_path / "runs"
    assert main(["--defense", "ft", "--max-acc-drop", value, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--max-acc-drop {value}" in err and "[0, 100]" in err and "\n" not in err
    assert not out.exists()
