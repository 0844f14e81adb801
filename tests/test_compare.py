"""``python -m tuner compare``: bad input refused before anything runs, the comparison rendered
from hand-made run folders (no Ray), and one end-to-end smoke run under Ray."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.report.compare import collect_compare, write_compare
from tuner.spec import ExperimentSpec
from zoo.victims import ZooSpec

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _pa(acc: float, asr: float) -> dict:
    return {"acc": acc, "asr": asr, "ra": 50.0, "der": 60.0}


def _run(acc: float, asr: float, seed: int) -> dict:
    return {"victim_seed": 0, "defense_seed": seed, "per_attack": {
        "badnets": {"before": {"acc": 95.0, "asr": 99.0, "ra": 1.0}, "after": _pa(acc, asr)}}}


def _defense_run(root: Path, defense: str, tuned: tuple[float, float],
                 default: tuple[float, float], seconds: float) -> None:
    run = root / defense
    run.mkdir(parents=True)
    spec = ExperimentSpec(defense=defense, name=defense, output=root, num_samples=2,
                          zoo=ZooSpec(attacks=("badnets",))).to_dict()
    trials = [{"number": i, "trial_id": f"t{i}", "params": {"lr": 0.01 * (i + 1)},
               "state": "complete", "epochs": 3, "score": 50.0, "values": [50.0],
               "per_attack": {"badnets": _pa(90.0, 40.0)}, "diverged": False, "error": None,
               "seconds": seconds} for i in range(2)]
    final = {"format": 2,
             "best": {"params": {"lr": 0.02}, "val_score": 60.0, "trial": 1,
                      "runs": [_run(*tuned, 0), _run(tuned[0] + 2, tuned[1], 1)]},
             "default": {"params": {"lr": 0.01}, "val_score": 50.0,
                         "runs": [_run(*default, 0), _run(*default, 1)]},
             "no_defense": {"runs": [{"victim_seed": 0, "per_attack": {
                 "badnets": {"acc": 95.0, "asr": 99.0, "ra": 1.0}}}]},
             "sizes": {"test_clean": 360, "val_clean": 359}}
    for name, obj in (("spec.json", spec), ("trials.json", trials), ("final.json", final),
                      ("timing.json", {"wall_seconds": 10 * seconds})):
        (run / name).write_text(json.dumps(obj))


@pytest.fixture()
def compare_dir(tmp_path: Path) -> Path:
    (tmp_path / "compare_spec.json").write_text(json.dumps(
        {"defenses": ["ft", "lp", "ngf"], "budget_trials": 2, "budget_seconds": None}))
    _defense_run(tmp_path, "ft", tuned=(90.0, 10.0), default=(92.0, 80.0), seconds=2.0)
    _defense_run(tmp_path, "lp", tuned=(94.0, 4.0), default=(93.0, 60.0), seconds=1.0)
    return tmp_path  # ngf has not finished


def test_ranking_is_by_tuned_test_score_with_cost_and_missing_named(compare_dir: Path) -> None:
    c = collect_compare(compare_dir)
    assert [d.spec.defense for d in c.ranked] == ["lp", "ft"] and c.missing == ["ngf"]
    write_compare(compare_dir)
    data = json.loads((compare_dir / "compare.json").read_text())
    lp = data["ranking"][0]
    assert (lp["rank"], lp["defense"]) == (1, "lp")
    assert lp["tuned"]["score"] == pytest.approx((90 + 92) / 2)  # acc - asr: 94-4, 96-4
    assert lp["default"]["mean_asr"] == pytest.approx(60.0)
    assert {k: lp["cost"][k] for k in ("trials", "epochs", "trial_seconds", "wall_seconds")} \
        == {"trials": 2, "epochs": 6, "trial_seconds": 2.0, "wall_seconds": 10.0}
    assert data["protocol"]["budget_trials"] == 2 and data["missing"] == ["ngf"]
    md = (compare_dir / "compare.md").read_text()
    for needle in ("## Protocol", "the same val/test split", "## Ranking", "### ft",
                   "### lp", "Not finished (run the same command with --resume): ngf",
                   "![Mean ACC against mean ASR", "No defense (the undefended victims, test): "
                   "mean ACC 95.0, mean ASR 99.0"):
        assert needle in md, needle
    assert (compare_dir / "compare.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--defenses", "ft,nope"], "--defenses 'nope': expected one of ft,"),
    (["--defenses", "ft,ft"], "--defenses names ft twice"),
    (["--defenses", "ft,lp", "--budget-trials", "3", "--budget-seconds", "60"],
     "expected one budget, not both"),
    (["--defenses", "ft", "--budget-trials", "0"], "--budget-trials 0"),
    (["--defenses", "ft", "--budget-seconds", "-5"], "--budget-seconds -5"),
    (["--defenses", "ft,lp", "--space", "search_spaces/ft.yaml"], "one space file cannot"),
    (["--defenses", "ft", "--max-acc-drop", "-1"], "--max-acc-drop -1"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys,
                                                         argv: list[str], needle: str) -> None:
    out = tmp_path / "runs"
    assert main(["compare", *argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not out.exists()


def test_resume_needs_an_earlier_comparison(tmp_path: Path, capsys) -> None:
    assert main(["compare", "--defenses", "ft", "--output", str(tmp_path), "--name", "c",
                 "--resume"]) == 2
    assert "no comparison to continue" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_smoke_end_to_end_and_resume_keeps_finished_searches(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tuner", "compare", "--defenses", "ft,lp", "--smoke-test",
            "--output", str(tmp_path / "runs"), "--zoo-dir", str(tmp_path / "zoo"),
            "--name", "c", "--max-acc-drop", "50"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=880, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    root = tmp_path / "runs" / "c"
    for name in ("compare.md", "compare.json", "compare.png", "compare_spec.json",
                 "ft/report.md", "lp/report.md", "ft/study.db", "lp/trials.csv"):
        assert (root / name).is_file(), name
    data = json.loads((root / "compare.json").read_text())
    assert sorted(d["defense"] for d in data["ranking"]) == ["ft", "lp"]
    assert all(d["cost"]["trials"] == 2 and d["tuned"] is not None for d in data["ranking"])
    specs = [json.loads((root / d / "spec.json").read_text()) for d in ("ft", "lp")]
    assert specs[0]["zoo"] == specs[1]["zoo"] and specs[0]["max_acc_drop"] == 50.0
    # the constraint reached each search's study through Ray
    trials = json.loads((root / "ft" / "trials.json").read_text())
    assert all(t["acc_drop"] is not None for t in trials)
    # cost: per trial in trials.csv, per defense in compare.json
    for d in ("ft", "lp"):
        rows = list(csv.DictReader((root / d / "trials.csv").open()))
        assert rows and all(float(r["cpu_seconds"]) > 0 and float(r["device_seconds"]) > 0
                            and float(r["seconds"]) > 0 for r in rows)
    assert all(d["cost"]["device_seconds"] > 0 for d in data["ranking"])
    before = (root / "ft" / "final.json").read_text()
    r = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ft already searched" in r.stdout and "lp already searched" in r.stdout
    assert (root / "ft" / "final.json").read_text() == before
