"""The report renders from hand-made raw files, without Ray."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.errors import UsageError
from tuner.report import collect, write_report
from tuner.report.markdown import render_markdown
from tuner.spec import ExperimentSpec
from zoo.victims import ZooSpec

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "defense": "ft", "path": "search_spaces/ft.yaml",
    "params": {
        "lr": {"name": "FloatDistribution",
               "attributes": {"low": 0.001, "high": 0.05, "log": True, "step": None}},
        "epochs": {"name": "IntDistribution",
                   "attributes": {"low": 5, "high": 20, "log": False, "step": 1}},
    },
    "default": {"lr": 0.01, "epochs": 10}, "constraints": [],
}


def _pa(acc: float, asr: float, ra: float = 50.0, der: float = 60.0) -> dict:
    return {"acc": acc, "asr": asr, "ra": ra, "der": der}


def _trial(i: int, lr: float, epochs: int, acc: float, asr: float, **kw) -> dict:
    per = {"badnets": _pa(acc, asr), "blended": _pa(acc - 2, asr + 4)}
    score = (acc - asr + acc - 2 - asr - 4) / 2
    row = {"number": i, "trial_id": f"t{i}", "params": {"lr": lr, "epochs": epochs},
           "state": "complete", "epochs": epochs, "score": score, "values": [score],
           "per_attack": per, "diverged": False, "error": None, "seconds": 1.5, "history": []}
    row.update(kw)
    return row


def _seed(shift: float, seed: int = 0) -> dict:
    per = {"badnets": {"before": _pa(95, 99, 1), "after": _pa(90 + shift, 5 + shift), "seconds": 1},
           "blended": {"before": _pa(94, 98, 1), "after": _pa(88 + shift, 10), "seconds": 1},
           "sig": {"before": _pa(93, 97, 2), "after": _pa(80, 30 - shift), "seconds": 1}}
    return {"victim_seed": 0, "defense_seed": seed, "per_attack": per}


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    spec = ExperimentSpec(defense="ft", name="run", output=tmp_path, num_samples=6,
                          zoo=ZooSpec(attacks=("badnets", "blended"), poison_rate=0.1),
                          holdout_attacks=("sig",)).to_dict()
    spec["provenance"] = {"git_commit": "abc123", "versions": {"torch": "2.14.1"},
                          "sampler": {"class": "TPESampler", "seed": 0}}
    trials = [
        _trial(0, 0.01, 10, 90, 40),
        _trial(1, 0.03, 15, 88, 5),
        _trial(2, 0.002, 6, 95, 90),
        _trial(3, 0.04, 20, 0, 100, diverged=True, state="diverged", score=-100.0,
               values=[-100.0]),
        _trial(4, 0.02, 12, 0, 0, state="error", error="RuntimeError: boom", score=None,
               values=[], per_attack={}),
        _trial(5, 0.015, 8, 89, 20),
    ]
    final = {"format": 2,
             "best": {"params": {"lr": 0.03, "epochs": 15}, "val_score": 81.0, "trial": 1,
                      "runs": [_seed(0.0, 0), _seed(2.0, 1), _seed(4.0, 2)]},
             "default": {"params": {"lr": 0.01, "epochs": 10}, "val_score": 49.0,
                         "runs": [_seed(-10.0, 0), _seed(-8.0, 1), _seed(-12.0, 2)]},
             "no_defense": {"runs": [{"victim_seed": 0, "per_attack": {
                 "badnets": _pa(95, 99, 1), "blended": _pa(94, 98, 1), "sig": _pa(93, 97, 2)}}],
                 "val": {"badnets": _pa(95, 99, 1), "blended": _pa(94, 98, 1)}},
             "sizes": {"test_clean": 360, "val_clean": 359,
                       "test_triggered": {"badnets": 324, "blended": 324, "sig": 324},
                       "val_triggered": {"badnets": 323, "blended": 323}}}
    for name, obj in (("spec.json", spec), ("space.json", SPACE), ("trials.json", trials),
                      ("final.json", final), ("timing.json", {"wall_seconds": 123.4})):
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


OUTPUTS = ("report.md", "summary.json", "best_config.json", "trials.csv", "objective.png",
           "pareto.png", "importance.png")  # the last three are images


def test_write_report_writes_every_file_and_pngs_are_images(run_dir: Path) -> None:
    assert write_report(run_dir) == run_dir / "report.md"
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    for name in OUTPUTS[4:]:
        assert (run_dir / name).read_bytes().startswith(PNG), name


def test_summary_keys_and_seed_statistics(run_dir: Path) -> None:
    write_report(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    assert (s["num_trials"], s["failed_trials"], s["wall_seconds"]) == (6, 1, 123.4)
    assert s["trial_states"] == {"complete": 4, "diverged": 1, "error": 1}
    assert s["provenance"]["git_commit"] == "abc123"
    best = s["best"]
    assert best["params"] == {"lr": 0.03, "epochs": 15}
    assert best["test"]["runs"] == 3
    assert set(best["test"]["per_attack"]) == {"badnets", "blended", "sig"}  # held out included
    assert best["test"]["per_attack"]["badnets"]["acc"] == pytest.approx(92.0)  # 90, 92, 94
    assert best["test"]["per_attack"]["sig"]["asr"] == pytest.approx(28.0)
    # score per seed over the search attacks only: mean(acc-asr) of badnets and blended
    scores = [((90 + d) - (5 + d) + (88 + d) - 10) / 2 for d in (0.0, 2.0, 4.0)]
    assert best["test"]["score"] == pytest.approx(statistics.fmean(scores))
    assert best["test"]["score_std"] == pytest.approx(statistics.stdev(scores))
    assert s["default"]["params"] == {"lr": 0.01, "epochs": 10}
    assert s["no_defense"]["per_attack"]["sig"] == {"acc": 93.0, "asr": 97.0, "ra": 2.0}


def test_best_config_is_params_wrapper(run_dir: Path) -> None:
    write_report(run_dir)
    b = json.loads((run_dir / "best_config.json").read_text())
    assert b["params"] == {"lr": 0.03, "epochs": 15} and b["defense"] == "ft"


def test_trials_csv_has_one_row_per_trial(run_dir: Path) -> None:
    write_report(run_dir)
    with (run_dir / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial"] for r in rows] == [str(i) for i in range(6)]
    assert [r["trial_id"] for r in rows] == [f"t{i}" for i in range(6)]
    assert rows[4]["error"] == "RuntimeError: boom" and rows[4]["score"] == ""
    assert rows[3]["diverged"] == "True"
    assert float(rows[1]["param_lr"]) == 0.03 and float(rows[1]["badnets_asr"]) == 5.0


def test_report_md_has_sections_and_marks_holdout(run_dir: Path) -> None:
    md = write_report(run_dir).read_text()
    for section in ("## Search", "## Objective", "## Search space", "## Best configuration",
                    "## Test results per attack", "## Top-10 trials", "## Parameter importances",
                    "## Plots", "![Objective over trials](objective.png)"):
        assert section in md, section
    assert "sig (held out)" in md
    assert "RuntimeError: boom" in md
    assert "92.0 ± 2.0" in md  # badnets best ACC over the three seeds


def test_importances_computed_on_rebuilt_study(run_dir: Path) -> None:
    data = collect(run_dir)
    assert set(data.importances) == {"lr", "epochs"}
    assert sum(data.importances.values()) == pytest.approx(1.0)


def test_rendering_twice_is_identical(run_dir: Path) -> None:
    write_report(run_dir)
    first = {n: (run_dir / n).read_bytes() for n in OUTPUTS}
    write_report(run_dir)
    assert {n: (run_dir / n).read_bytes() for n in OUTPUTS} == first


def test_run_without_final_or_space_still_renders(run_dir: Path) -> None:
    (run_dir / "final.json").unlink()
    (run_dir / "space.json").unlink()
    write_report(run_dir)
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["best"]["params"] == {"lr": 0.03, "epochs": 15}  # best by val among usable trials
    assert s["best"]["test"] is None
    assert "not computed" in (run_dir / "report.md").read_text()


def test_missing_or_invalid_run_dir_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        collect(tmp_path / "nope")
    with pytest.raises(UsageError, match="spec.json: missing"):
        collect(tmp_path)
    (tmp_path / "spec.json").write_text("{not json")
    (tmp_path / "trials.json").write_text("[]")
    with pytest.raises(UsageError, match="not valid JSON"):
        collect(tmp_path)


def test_cli_report_rerenders_and_reports_bad_dir(run_dir: Path, tmp_path_factory) -> None:
    ok = subprocess.run([sys.executable, "-m", "tuner", "report", str(run_dir)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (run_dir / "report.md").is_file() and str(run_dir / "report.md") in ok.stdout
    bad = tmp_path_factory.mktemp("empty") / "missing"
    out = subprocess.run([sys.executable, "-m", "tuner", "report", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a directory" in out.stderr


def test_poison_rate_row_names_the_attacks_off_the_default(run_dir: Path) -> None:
    assert "| poison rate | 0.10 |" in render_markdown(collect(run_dir))
    spec = json.loads((run_dir / "spec.json").read_text())
    spec["zoo"]["poison_rate"] = None
    (run_dir / "spec.json").write_text(json.dumps(spec))
    final = json.loads((run_dir / "final.json").read_text())
    final["poison_rates"] = {"none": None, "badnets": 0.1, "blended": 0.1, "sig": 0.08}
    (run_dir / "final.json").write_text(json.dumps(final))
    assert "| poison rate | 0.1 (sig 0.08) |" in render_markdown(collect(run_dir))


def test_model_row_names_each_victims_model_when_some_came_from_elsewhere(run_dir: Path) -> None:
    md = render_markdown(collect(run_dir))
    assert "| model | cnn |" in md and "(cnn)" in md.splitlines()[0]
    final = json.loads((run_dir / "final.json").read_text())
    final["archs"] = {"badnets": "cnn", "blended": "cnn", "bb:theirs": "preact-resnet18"}
    (run_dir / "final.json").write_text(json.dumps(final))
    md = render_markdown(collect(run_dir))
    assert "| model | cnn (badnets, blended); preact-resnet18 (bb:theirs) |" in md
    final["archs"] = ["cnn"]
    (run_dir / "final.json").write_text(json.dumps(final))
    with pytest.raises(UsageError, match="archs"):
        collect(run_dir)


# -- what the report concludes -------------------------------------------------------------------
def test_verdict_per_attack_and_overall(run_dir: Path) -> None:
    v = collect(run_dir).verdict
    assert v is not None and (v.asr_threshold, v.acc_budget) == (10.0, 3.0)
    status = {r.attack: r.status for r in v.attacks}
    assert status == {"badnets": "removed", "blended": "reduced", "sig": "reduced"}
    assert v.headline.startswith("Backdoor removed on 1 of 2 search attacks")
    # paired over the same three runs: best - default = 5, 5 and 8 points
    assert v.gain == pytest.approx(6.0) and v.gain_ci == pytest.approx(4.3027,
                                                                       rel=1e-3)
    loose = collect(run_dir, verdict_asr=11.0, verdict_acc_drop=5.0).verdict
    assert loose is not None and loose.headline == "Backdoor removed on all 2 search attacks" \
        "; held out: 0 of 1 removed"
    md = render_markdown(collect(run_dir))
    assert md.index("## Verdict") < md.index("## Search") and "| badnets | removed |" in md


def _edit(run_dir: Path, name: str, change) -> None:
    data = json.loads((run_dir / name).read_text())
    change(data)
    (run_dir / name).write_text(json.dumps(data))


def test_no_warning_on_a_normal_run(run_dir: Path) -> None:
    assert collect(run_dir).warnings == []


def test_warns_when_the_best_value_sits_at_the_edge_of_its_range(run_dir: Path) -> None:
    _edit(run_dir, "final.json", lambda f: f["best"]["params"].update(lr=0.049))
    (w,) = collect(run_dir).warnings
    assert "lr = 0.049 lies at the upper edge of its range [0.001, 0.05]" in w
    assert "params.lr" in w and "--space" in w


def test_warns_when_asha_stopped_most_trials(run_dir: Path) -> None:
    def prune(trials: list) -> None:
        for t in trials[1:]:
            t["state"] = "pruned" if t["state"] == "complete" else t["state"]
    _edit(run_dir, "trials.json", prune)
    (w,) = collect(run_dir).warnings  # 3 of the 4 trials with val scores stopped early
    assert "ASHA stopped 3 of 4 trials early" in w and "--scheduler fifo" in w


def test_warns_when_no_trial_beats_no_defense_beyond_noise(run_dir: Path) -> None:
    def flat(trials: list) -> None:  # no defense scores -4.0 on val
        for t in trials:
            if t["score"] is not None and t["state"] == "complete":
                t["score"] = t["values"][0] = -3.5
    _edit(run_dir, "trials.json", flat)
    (w,) = collect(run_dir).warnings
    assert "No trial scored more than" in w and "no defense (-4.0)" in w


@pytest.mark.filterwarnings("ignore:PedAnovaImportanceEvaluator computes")  # dashboard negates too
def test_importances_are_optuna_dashboards_on_the_same_study(run_dir: Path) -> None:
    import optuna

    from tuner.records import TrialRecord
    from tuner.spaces import space_from_json
    from tuner.study import export

    data = collect(run_dir)
    trials = [TrialRecord.from_json(t, "t") for t in json.loads((run_dir / "trials.json").read_text())]
    export(run_dir / "study.db", trials, space_from_json(SPACE).distributions, "mean", "s")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{run_dir / 'study.db'}")
    dashboard = optuna.importance.get_param_importances(  # optuna-dashboard's call, maximize
        study, target=lambda t: -t.values[0],
        evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    assert data.importances == pytest.approx(dict(dashboard)) and data.importances
