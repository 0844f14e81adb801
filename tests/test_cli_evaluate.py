"""tuner.evaluation (fake victims, real defenses) and ``python -m tuner evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import defenses
from defenses import EpochResult
from tuner import evaluation
from tuner.cmd_evaluate import parse_params
from tuner.errors import UsageError
from tuner.evaluation import DIVERGED_METRICS, run_config, trial_epochs
from zoo.data import Split, load_splits
from zoo.metrics import Metrics
from zoo.models import build_model

CPU = torch.device("cpu")


@dataclass
class FakeVictim:
    """What tuner.evaluation uses of zoo.victims.Victim: a random cnn, 'triggered' = clean."""

    attack: str
    arch: str
    info: object
    bd_val: Split
    bd_test: Split
    target: int = 0
    seed: int = 0

    @property
    def metrics(self) -> dict[str, Metrics]:
        return {"val": Metrics(90.0, 95.0, 3.0), "test": Metrics(91.0, 96.0, 2.0)}

    def model(self, device: torch.device) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        return build_model(self.arch, self.info).to(device)


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits", seed=0)


@pytest.fixture(scope="module")
def victims(splits):
    return [FakeVictim(a, "cnn", splits.info, splits.val, splits.test, seed=i)
            for i, a in enumerate(("badnets", "blended"))]


def test_trial_epochs_yields_per_epoch_val_metrics(splits, victims) -> None:
    items = list(trial_epochs("fst", {"epochs": 2}, victims, splits, seed=0, device=CPU))
    assert [i["epoch"] for i in items] == [1, 2]
    for item in items:
        assert set(item["per_attack"]) == {"badnets", "blended"} and not item["diverged"]
        for m in item["per_attack"].values():
            assert set(m) == {"acc", "asr", "ra", "der"}
            assert all(0.0 <= v <= 100.0 for v in m.values())
        assert isinstance(item["loss"], float)


def test_max_epochs_caps_the_config(splits, victims) -> None:
    items = list(trial_epochs("lp", {"epochs": 5}, victims[:1], splits, seed=0, device=CPU,
                              max_epochs=1))
    assert len(items) == 1


def _diverging_run(real: defenses.Defense):
    """``real``'s defense as a stand-in whose models marked ``diverges`` diverge at epoch 2 (a
    mark on the model, not its id: a freed model's id is reused by the next one)."""

    def run(model, clean, info, cfg, *, seed, device, precision="auto"):
        for epoch in range(1, cfg.epochs + 1):
            if getattr(model, "diverges", False) and epoch == 2:
                yield EpochResult(epoch, float("nan"), cfg.lr, True)
                return
            yield EpochResult(epoch, 1.0 / epoch, cfg.lr, False)

    return defenses.Defense(real.name, real.config_cls, run, real.doc)


def test_diverged_victim_stays_worst_case_others_continue(splits, victims, monkeypatch) -> None:
    real_model = FakeVictim.model

    def model(self, device):
        m = real_model(self, device)
        m.diverges = self.attack == "blended"
        return m

    monkeypatch.setattr(FakeVictim, "model", model)
    fake = _diverging_run(defenses.get_defense("fst"))
    monkeypatch.setattr(evaluation, "get_defense", lambda name: fake)
    items = list(trial_epochs("fst", {"epochs": 4}, victims, splits, seed=0, device=CPU))
    assert [i["epoch"] for i in items] == [1, 2, 3, 4]
    assert not items[0]["diverged"]
    for item in items[1:]:
        assert item["diverged"] and item["diverged_attacks"] == ["blended"]
        assert item["per_attack"]["blended"] == DIVERGED_METRICS
        assert item["per_attack"]["badnets"]["acc"] > 0.0
    out = run_config("fst", {"epochs": 4}, victims, splits, seed=0, device=CPU)
    assert out["blended"]["diverged"] and out["blended"]["after"] == DIVERGED_METRICS
    assert not out["badnets"]["diverged"] and out["badnets"]["epochs"] == 4


def test_run_config_measures_test_against_victim_metrics(splits, victims) -> None:
    out = run_config("lp", {"epochs": 1}, victims[:1], splits, seed=0, device=CPU, split="test")
    assert set(out) == {"badnets"}
    r = out["badnets"]
    assert r["before"] == {"acc": 91.0, "asr": 96.0, "ra": 2.0}
    after = r["after"]
    expected_der = (max(0.0, 96.0 - after["asr"]) - max(0.0, 91.0 - after["acc"]) + 100.0) / 2.0
    assert after["der"] == pytest.approx(expected_der)
    assert r["seconds"] > 0.0
    again = run_config("lp", {"epochs": 1}, victims[:1], splits, seed=0, device=CPU, split="test")
    assert again["badnets"]["after"] == after  # same seed, same numbers


# ---------------------------------------------------------------------------------------------
# --params parsing and the CLI
# ---------------------------------------------------------------------------------------------


def test_parse_params_inline_flat_file_and_best_config(tmp_path: Path) -> None:
    assert parse_params(None) == ({}, None)
    assert parse_params('{"lr": 0.02}') == ({"lr": 0.02}, None)
    flat = tmp_path / "flat.json"
    flat.write_text('{"epochs": 3}')
    assert parse_params(str(flat)) == ({"epochs": 3}, None)
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"defense": "ngf", "params": {"damping": 0.01}, "val_score": 5}))
    assert parse_params(str(best)) == ({"damping": 0.01}, "ngf")
    with pytest.raises(UsageError, match="neither JSON nor a readable file"):
        parse_params("{lr: 1")
    with pytest.raises(UsageError, match="expected a JSON object"):
        parse_params("[1, 2]")


def _cli(*argv: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", "evaluate", *argv,
                           "--zoo-dir", str(tmp_path / "zoo")],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("argv, fragment", [
    (["--defense", "nope"], "invalid choice: 'nope'"),
    (["--defense", "ngf", "--params", "{oops"], "neither JSON nor a readable file"),
    (["--defense", "ngf", "--params", '{"dampin": 0.1}'], "dampin"),
    (["--defense", "ngf", "--params", '{"epochs": "ten"}'], "epochs"),
    (["--defense", "ngf", "--attacks", "badnets,nosuch"], "unknown attack 'nosuch'"),
])
def test_cli_rejects_bad_input_in_one_line_before_building(argv, fragment, tmp_path) -> None:
    out = _cli(*argv, tmp_path=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and fragment in out.stderr
    assert not (tmp_path / "zoo").exists()  # nothing was built


@pytest.mark.slow
def test_cli_json_end_to_end_on_digits(tmp_path: Path) -> None:
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"defense": "ngf", "params": {"epochs": 1}}))
    out = _cli("--params", str(best), "--attacks", "badnets", "--seeds", "2", "--json",
               tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # stdout is only JSON; the defense comes from the file
    assert data["defense"] == "ngf" and data["params"]["epochs"] == 1
    assert data["params"]["damping"] == 0.001  # the full resolved config
    assert data["defense_seeds"] == [0, 1] and len(data["runs"]) == 2
    r = data["runs"][0]["badnets"]
    assert set(r) == {"before", "after", "seconds", "diverged"}
    assert set(r["before"]) == {"acc", "asr", "ra"} and set(r["after"]) == {"acc", "asr", "ra", "der"}
    accs = [run["badnets"]["after"]["acc"] for run in data["runs"]]
    assert data["summary"]["after acc"]["mean"] == pytest.approx(sum(accs) / 2)


def test_cli_takes_the_defense_from_the_params_file_or_refuses_a_mismatch(tmp_path) -> None:
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"defense": "ngf", "params": {"damping": 0.01}}))
    for argv, fragment in ((["--defense", "ft", "--params", str(best)],
                            "--defense ft but --params is a ngf configuration"),
                           (["--params", '{"lr": 0.1}'], "--defense is required"),
                           (["--params", str(best), "--seeds", "0"], "--seeds 0")):
        out = _cli(*argv, tmp_path=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert fragment in out.stderr and not (tmp_path / "zoo").exists()
