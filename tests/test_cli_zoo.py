"""``python -m tuner zoo`` as a subprocess: JSON output, store reuse, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _zoo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner", "zoo", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.slow
def test_zoo_json_builds_then_loads(tmp_path) -> None:
    zoo = str(tmp_path / "zoo")
    first = _zoo("--attacks", "badnets", "--json", "--zoo-dir", zoo, "--device", "cpu")
    assert first.returncode == 0, first.stderr
    rows = json.loads(first.stdout)  # stdout holds only the JSON list
    assert len(rows) == 1
    row = rows[0]
    assert {"attack", "dataset", "arch", "acc", "asr", "ra", "built", "seconds", "val_acc", "val_asr"} <= set(row)
    assert row["attack"] == "badnets" and row["built"] is True
    assert row["acc"] > 90 and row["asr"] > 90
    assert "training badnets victim" in first.stderr
    second = _zoo("--attacks", "badnets", "--json", "--zoo-dir", zoo, "--device", "cpu")
    assert second.returncode == 0, second.stderr
    (again,) = json.loads(second.stdout)
    assert again["built"] is False and again["asr"] == row["asr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attacks", "badnets,nope"], "unknown attack 'nope'"),
        (["--attacks", "badnets", "--poison-rate", "1.5"], "--poison-rate 1.5"),
        (["--attacks", "sig", "--poison-rate", "0.5"], "needs 539 target-class images but class 0 has 107"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message) -> None:
    zoo = tmp_path / "zoo"
    result = _zoo(*args, "--zoo-dir", str(zoo), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert result.stdout == ""
    assert not zoo.exists() or not any(zoo.iterdir())


def test_missing_data_root_names_the_layout(tmp_path) -> None:
    nowhere = tmp_path / "nowhere"
    missing = _zoo("--dataset", "mnist", "--data-root", str(nowhere), "--zoo-dir",
                   str(tmp_path / "zoo"), timeout=120)
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert "is not a directory" in line and "ROOT/MNIST/raw/" in line, line
