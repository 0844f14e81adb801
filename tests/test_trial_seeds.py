"""--trial-seeds K: each trial runs K seeds (clean-subset draw and training order) and reports
the mean, with the spread in its record and the report. No Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from tuner.evaluation import seeded_epochs
from tuner.records import TrialRecord, epoch_report
from tuner.report import write_report
from tuner.spec import ExperimentSpec
from zoo.data import load_splits, redraw_clean
from zoo.victims import ZooSpec


def test_redraw_clean_is_the_draw_of_that_seed_and_keeps_the_rest() -> None:
    s0, s1 = load_splits("digits", seed=0), load_splits("digits", seed=1)
    again = redraw_clean(s0, seed=1, dataset="digits")
    assert bool((again.clean.x == s1.clean.x).all())  # the subset --seed 1 draws
    assert not bool((again.clean.x == s0.clean.x).all())
    assert again.val is s0.val and again.test is s0.test and again.train is s0.train


def _fake_epochs(calls: list[tuple[int, Any]]) -> Any:
    def fn(defense: str, params: Any, victims: Any, splits: Any, *, seed: int,
           **kw: Any) -> Any:
        calls.append((seed, splits))
        for epoch in (1, 2):
            acc = 80.0 + 10 * seed + epoch
            yield {"epoch": epoch, "diverged": False, "loss": 1.0, "diverged_attacks": [],
                   "per_attack": {"badnets": {"acc": acc, "asr": 10.0, "ra": 50.0,
                                              "der": 60.0}}}
    return fn


def test_one_seed_is_the_plain_trial() -> None:
    calls: list[tuple[int, Any]] = []
    splits = load_splits("digits")
    items = list(seeded_epochs(_fake_epochs(calls), "ft", {}, [], splits, seeds=[0]))
    assert [i["per_attack"]["badnets"]["acc"] for i in items] == [81.0, 82.0]
    assert "seeds" not in items[0] and calls == [(0, splits)]


def test_k_seeds_report_the_mean_and_each_seed_draws_its_clean_subset() -> None:
    calls: list[tuple[int, Any]] = []
    splits = load_splits("digits")
    items = list(seeded_epochs(_fake_epochs(calls), "ft", {}, [], splits, seeds=[0, 1, 2]))
    assert [s for s, _ in calls] == [0, 1, 2]
    assert calls[0][1] is splits and calls[1][1].clean.x.shape == splits.clean.x.shape
    assert not bool((calls[1][1].clean.x == splits.clean.x).all())
    assert [i["epoch"] for i in items] == [1, 2]
    assert items[-1]["per_attack"]["badnets"]["acc"] == pytest.approx(92.0)  # 82, 92, 102
    report = epoch_report(items[-1], "mean", planned=2)
    assert report["score"] == pytest.approx(82.0)
    assert report["seed_scores"] == pytest.approx([72.0, 82.0, 92.0])
    assert report["score_std"] == pytest.approx(10.0)


def test_trial_seeds_flag_is_checked_before_anything_starts(tmp_path: Path, capsys) -> None:
    from tuner.cli import main

    out = tmp_path / "runs"
    assert main(["--defense", "ft", "--trial-seeds", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--trial-seeds 0: expected a whole number in 1.." in err and "\n" not in err
    assert not out.exists()


def test_record_and_report_carry_the_spread(tmp_path: Path) -> None:
    rec = TrialRecord.from_result(
        number=0, trial_id="t0", params={"lr": 0.01}, status="TERMINATED",
        last={"epoch": 1, "score": 80.0, "value_0": 80.0, "badnets/acc": 90.0,
              "badnets/asr": 10.0, "badnets/ra": 50.0, "badnets/der": 60.0,
              "seed_scores": [78.0, 80.0, 82.0], "score_std": 2.0, "finished": True},
        history=[], objective="mean", error=None)
    assert rec.seed_scores == (78.0, 80.0, 82.0) and rec.score_std == pytest.approx(2.0)
    assert TrialRecord.from_json(rec.to_json(), "t").seed_scores == rec.seed_scores
    spec = ExperimentSpec(defense="ft", name="run", output=tmp_path, num_samples=1,
                          trial_seeds=3, zoo=ZooSpec(attacks=("badnets",))).to_dict()
    for name, obj in (("spec.json", spec), ("trials.json", [rec.to_json()])):
        (tmp_path / name).write_text(json.dumps(obj))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "80.00 ± 2.00" in md and "Each trial ran 3 seeds" in md
    row = next(csv.DictReader((tmp_path / "trials.csv").open()))
    assert float(row["score_std"]) == pytest.approx(2.0) and row["seed_scores"] == "78;80;82"
