"""Cost, everywhere: each trial's wall, CPU and device seconds (and GPU peak on CUDA) reach
its record, trials.csv, timing.json and the report's header. No Ray."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tuner.evaluation import CostMeter
from tuner.records import TrialRecord
from tuner.report import write_report
from tuner.search import timing
from tuner.spec import ExperimentSpec
from zoo.victims import ZooSpec


def test_cost_meter_counts_cpu_seconds_of_the_work_done() -> None:
    meter = CostMeter(torch.device("cpu"))
    x = torch.randn(256, 256)
    for _ in range(200):
        x = torch.tanh(x @ x.T / 256)
    cost = meter.read(gpus=0.0)
    assert cost["cpu_seconds"] > 0 and cost["device_seconds"] == cost["cpu_seconds"]
    assert "gpu_peak_mb" not in cost  # measured on CUDA only


def _record(number: int, cpu: float) -> TrialRecord:
    return TrialRecord.from_result(
        number=number, trial_id=f"t{number}", params={"lr": 0.01}, status="TERMINATED",
        last={"epoch": 2, "score": 70.0, "value_0": 70.0, "badnets/acc": 90.0,
              "badnets/asr": 20.0, "badnets/ra": 50.0, "badnets/der": 60.0,
              "time_total_s": 2.5, "cpu_seconds": cpu, "device_seconds": cpu},
        history=[], objective="mean", error=None)


def test_cost_columns_in_trials_csv_and_cost_in_the_report_header(tmp_path: Path) -> None:
    records = [_record(0, 2.0), _record(1, 3.0)]
    assert TrialRecord.from_json(records[1].to_json(), "t").cpu_seconds == 3.0
    spec = ExperimentSpec(defense="ft", name="run", output=tmp_path, num_samples=2,
                          zoo=ZooSpec(attacks=("badnets",))).to_dict()
    t = timing(wall=20.0, victims=1.0, search=8.0, final=4.0, ray_waited=0.5, records=records,
               slots=1, final_cpu=3.5, victims_built=2)
    assert (t["trial_cpu_seconds"], t["device_seconds"], t["victims_built"]) == (5.0, 5.0, 2)
    for name, obj in (("spec.json", spec), ("trials.json", [r.to_json() for r in records]),
                      ("timing.json", t)):
        (tmp_path / name).write_text(json.dumps(obj))
    write_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    for col in ("seconds", "cpu_seconds", "device_seconds"):
        assert all(float(r[col]) > 0 for r in rows), col
    assert [r["gpu_peak_mb"] for r in rows] == ["", ""]  # CPU trials
    md = (tmp_path / "report.md").read_text()
    assert ("search: 2 trials, 4 epochs, 5.0 s trial wall, 5.0 CPU-s, 5.0 device-s; final "
            "evaluations 4.0 s wall, 3.5 CPU-s; 2 victim(s) built") in md
    cost = json.loads((tmp_path / "summary.json").read_text())["cost"]
    assert cost["device_seconds"] == pytest.approx(5.0) and cost["victims_built"] == 2


def test_a_trial_the_time_budget_stopped_before_its_first_epoch_is_incomplete() -> None:
    rec = TrialRecord.from_result(number=3, trial_id="t3", params={"lr": 0.01},
                                  status="TERMINATED", last={}, history=[], objective="mean",
                                  error=None)
    assert rec.state == "incomplete" and not rec.usable
