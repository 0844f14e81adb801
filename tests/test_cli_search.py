"""``python -m tuner`` (the search) as a user runs it, in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILES = ("spec.json", "space.json", "trials.json", "final.json", "timing.json",
                "study.db", "report.md", "summary.json", "best_config.json", "trials.csv")


def tuner(*argv: str, timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tuner", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_help_explains_every_search_flag(tmp_path: Path) -> None:
    out = tuner("search", "--help", timeout=60, cwd=tmp_path).stdout
    for flag in ("--defense", "--attacks", "--holdout-attacks", "--objective", "--num-samples",
                 "--max-concurrent", "--scheduler", "--max-epochs", "--gpus-per-trial",
                 "--cpus-per-trial", "--address", "--output", "--name", "--resume",
                 "--final-seeds", "--space", "--zoo-dir", "--smoke-test", "--seed"):
        assert flag in out, flag
    assert "(default None)" not in out and "(default: " not in out  # defaults said in words
    assert "(default 16; 2 with --smoke-test)" in out  # the spec's defaults, smoke ones too


def test_bad_flag_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    r = tuner("--defense", "ft", "--attacks", "badnets", "--holdout-attacks", "badnets",
              "--output", str(tmp_path / "runs"), timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--holdout-attacks" in r.stderr and not (tmp_path / "runs").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_search_writes_the_whole_report(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    r = tuner("--defense", "ft", "--smoke-test", "--output", str(tmp_path / "runs"),
              "--zoo-dir", str(tmp_path / "zoo"), "--name", "smoke", "--mlflow", "mlruns",
              timeout=590, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "smoke"
    for name in REPORT_FILES:
        assert (run / name).is_file(), name
    assert "done (  2/2)" in r.stdout and str(run / "report.md") in r.stdout
    assert "best found" in r.stdout and "no defense" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    for key in ("defense", "dataset", "attacks", "objective", "num_trials", "best", "default",
                "no_defense", "wall_seconds"):
        assert key in summary, key
    assert summary["num_trials"] == 2 and summary["attacks"] == ["badnets"]
    timing = json.loads((run / "timing.json").read_text())
    assert timing["trials"] == 2 and timing["slots"] >= 1 and 0.0 <= timing["ray_overhead_share"] < 1.0
    assert timing["trial_seconds"] > 0 and timing["wall_seconds"] > timing["search_seconds"] > 0
    # the default is measured before the search (while Ray starts), the best after it
    assert r.stdout.index("paper default on test") < r.stdout.index("search: 2 trials")
    trials = json.loads((run / "trials.json").read_text())
    assert all(t["state"] == "complete" and t["epochs"] == 1 for t in trials)
    # Tune logs JSON (read back for trials.json) and CSV per trial, no TensorBoard events
    assert len(list(run.glob("ray/trial_*/result.json"))) == 2
    assert not list(run.glob("ray/trial_*/events.out.tfevents*"))
    final = json.loads((run / "final.json").read_text())
    assert final["best"]["params"]["epochs"] == 1 and len(final["best"]["runs"]) == 1
    # one numbering: the console, trials.csv and study.db (optuna-dashboard) name the same trials
    console = sorted(int(m) for m in re.findall(r"^  trial +(\d+) done", r.stdout, re.M))
    with open(run / "trials.csv", newline="") as f:
        rows = {int(row["trial"]): row for row in csv.DictReader(f)}
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{run / 'study.db'}")
    assert console == sorted(rows) == [t.number for t in study.trials] == [0, 1]
    for t in study.trials:
        assert float(rows[t.number]["param_lr"]) == pytest.approx(t.params["lr"])
    # --mlflow (a path relative to where the search ran): the same trials, one MLflow run each
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores only so
    client = MlflowClient(tracking_uri=str(tmp_path / "mlruns"))
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
    logged = {int(m.data.params["trial_number"]): m for m in
              client.search_runs([experiment.experiment_id])}
    assert sorted(logged) == [0, 1]
    for t in study.trials:
        assert float(logged[t.number].data.params["lr"]) == pytest.approx(t.params["lr"])
        assert logged[t.number].data.metrics["score"] == pytest.approx(float(rows[t.number]["score"]))
