"""``python -m tuner purify``: the defender's command (tuner/cmd_purify.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from tuner import cli
from tuner.cmd_purify import PurifyCommand
from tuner.cmd_zoo import export
from tuner.errors import UsageError
from tuner.evaluation import run_config
from zoo.data import DatasetInfo, load_splits
from zoo.models import build_model
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims

ROOT = Path(__file__).resolve().parents[1]
RGB16 = DatasetInfo("imagefolder", 3, 16, 3, (0.5,) * 3, (0.25,) * 3, hflip=False, pad=2)
FT1 = '{"epochs": 1, "batch_size": 8}'


def folder_data(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), n: int = 10,
                size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8) + 60 * c
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def weights(path: Path, info: DatasetInfo = RGB16, arch: str = "cnn") -> Path:
    torch.manual_seed(0)
    path.write_bytes(save_safetensors(build_model(arch, info).state_dict()))
    return path


def triggered(path: Path, n: int = 12, channels: int = 3, size: int = 16) -> Path:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    y = np.arange(n) % 3
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    path.write_bytes(buf.getvalue())
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def purify(*argv: str) -> int:
    return cli.main(["purify", *argv])


def setup(tmp_path: Path) -> dict[str, Path]:
    return {"data": folder_data(tmp_path / "clean"), "w": weights(tmp_path / "suspect.safetensors"),
            "bd": triggered(tmp_path / "bd.npz"), "out": tmp_path / "out" / "purified.safetensors"}


# ---------------------------------------------------------------------------------------------
# The happy path
# ---------------------------------------------------------------------------------------------


def test_purify_writes_weights_and_card_and_leaves_the_input(tmp_path: Path, capsys: Any) -> None:
    p = setup(tmp_path)
    p["out"].parent.mkdir()
    before = sha(p["w"])
    rc = purify("--defense", "ft", "--params", FT1, "--weights", str(p["w"]), "--arch", "cnn",
                "--data-root", str(p["data"]), "--out", str(p["out"]), "--triggered",
                str(p["bd"]), "--target", "0", "--device", "cpu")
    io_ = capsys.readouterr()
    assert rc == 0, io_.err
    assert sha(p["w"]) == before  # the input is never modified
    out = load_file(p["out"])
    assert set(out) == set(build_model("cnn", RGB16).state_dict())
    assert not torch.equal(out["head.weight"], load_file(p["w"])["head.weight"])
    card = json.loads(p["out"].with_suffix(".json").read_text())
    assert card["defense"] == "ft" and card["config"]["epochs"] == 1
    assert card["config_source"] == {"kind": "inline"} and card["epochs_run"] == 1
    assert card["data"]["finetune_images"] == 24 and card["data"]["heldout_images"] == 6
    assert card["data"]["classes"] == 3 and len(card["data"]["sha256"]) == 64
    assert card["triggered"]["images"] == 8 and card["triggered"]["target"] == 0  # non-target
    assert set(card["metrics"]["before"]) == {"acc", "asr", "ra"}
    assert card["input"]["sha256"] == before and card["output"]["sha256"] == sha(p["out"])
    assert card["seeds"] == {"split": 0, "defense": 0} and "torch" in card["versions"]
    md = p["out"].with_suffix(".md").read_text()
    assert "| clean ACC (6 held-out images) |" in md and "ASR (8 triggered images" in md
    assert "purify: epoch 1/1: loss" in io_.err and "model card:" in io_.out


def test_from_run_takes_the_runs_best_configuration(tmp_path: Path, capsys: Any) -> None:
    p = setup(tmp_path)
    run = tmp_path / "runs" / "ft-demo"
    run.mkdir(parents=True)
    (run / "best_config.json").write_text(json.dumps({
        "defense": "ft", "dataset": "digits", "arch": "cnn", "objective": "mean",
        "params": {"epochs": 1, "batch_size": 8, "lr": 0.02}, "trial": 3, "val_score": 80.0,
        "test_score": 79.0, "run": "ft-demo", "git_commit": "abc"}))
    (run / "report.md").write_text("# report\n")
    rc = purify("--from-run", str(run), "--weights", str(p["w"]), "--arch", "cnn",
                "--data-root", str(p["data"]), "--out", str(tmp_path / "p.safetensors"),
                "--device", "cpu")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tuned with dataset digits; this run uses dataset imagefolder" in err
    card = json.loads((tmp_path / "p.json").read_text())
    src = card["config_source"]
    assert src["kind"] == "run" and src["run"] == "ft-demo" and src["trial"] == 3
    assert src["report"] == str(run / "report.md") and card["config"]["lr"] == 0.02
    assert card["triggered"] is None and set(card["metrics"]["after"]) == {"acc"}
    assert "best configuration of run `ft-demo` (trial 3" in (tmp_path / "p.md").read_text()


def test_greyscale_models_read_their_folders_in_grey(tmp_path: Path, capsys: Any) -> None:
    data = folder_data(tmp_path / "clean", classes=("0", "1", "2"))
    grey = DatasetInfo("imagefolder", 1, 16, 3, (0.5,), (0.25,), hflip=False, pad=2)
    w = weights(tmp_path / "grey.safetensors", grey)
    args = ("--defense", "ft", "--params", FT1, "--weights", str(w), "--arch", "cnn",
            "--data-root", str(data), "--out", str(tmp_path / "p.safetensors"), "--device", "cpu")
    assert purify(*args) == 2 and "expected [32, 3, 3, 3]" in capsys.readouterr().err
    assert purify(*args, "--channels", "1") == 0, capsys.readouterr().err
    card = json.loads((tmp_path / "p.json").read_text())
    assert card["data"]["normalization"]["mean"] != [0.5] and len(card["data"]["normalization"]
                                                                   ["mean"]) == 1


# ---------------------------------------------------------------------------------------------
# Bad input: refused before training, one line, nothing written
# ---------------------------------------------------------------------------------------------


def _nothing_written(tmp_path: Path) -> bool:
    return not any(tmp_path.glob("out/*"))


@pytest.mark.parametrize(("change", "message"), [
    ({"--arch": "preact-resnet18"}, "not a 'preact-resnet18' state_dict"),
    ({"--weights": "FIVE"}, r"head \(head.weight\) has 5 classes: expected 3"),
    ({"--weights": "GARBAGE"}, "not a safetensors file"),
    ({"--weights": "EVIL"}, "not a plain state_dict file .*posix.system"),
    ({"--data-root": "EMPTY"}, "no images in class folders"),
    ({"--holdout": "0.01"}, "no clean images held out to measure"),
    ({"--triggered": "SMALL"}, "images are 3x8x8 .*expected 3x16x16"),
    ({"--target": "7"}, "--target 7: expected 0..2"),
    ({"--params": '{"lr": "fast"}'}, "lr"),
    ({"--out": "suspect.safetensors"}, "would overwrite --weights"),
    ({"--out": "purified.pt"}, "expected a .safetensors file name"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: Any,
                                                  change: dict[str, str], message: str) -> None:
    p = setup(tmp_path)
    (tmp_path / "out").mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return os.system, (f"touch {marker}",)

    special = {
        "FIVE": lambda: weights(tmp_path / "five.safetensors",
                                DatasetInfo("x", 3, 16, 5, (0.5,) * 3, (0.25,) * 3, False, 2)),
        "GARBAGE": lambda: (tmp_path / "g.safetensors").write_bytes(b"\x00" * 64) and
        tmp_path / "g.safetensors",
        "EVIL": lambda: torch.save(Evil(), tmp_path / "e.pt") or tmp_path / "e.pt",
        "EMPTY": lambda: (tmp_path / "empty" / "cat").mkdir(parents=True) or tmp_path / "empty",
        "SMALL": lambda: triggered(tmp_path / "small.npz", size=8),
        "suspect.safetensors": lambda: p["w"],
        "purified.pt": lambda: tmp_path / "out" / "purified.pt",
    }
    args = {"--defense": "ft", "--params": FT1, "--weights": str(p["w"]), "--arch": "cnn",
            "--data-root": str(p["data"]), "--out": str(p["out"]), "--triggered": str(p["bd"]),
            "--target": "0", "--device": "cpu"}
    for flag, value in change.items():
        args[flag] = str(special[value]()) if value in special else value
    rc = purify(*[x for kv in args.items() for x in kv])
    io_ = capsys.readouterr()
    assert rc == 2 and io_.out == ""
    (line,) = io_.err.strip().splitlines()
    assert line.startswith("error: ") and re.search(message, line), line
    assert _nothing_written(tmp_path) and not marker.exists()


def test_command_checks_its_flags_on_construction(tmp_path: Path) -> None:
    w = tmp_path / "w.safetensors"
    base = {"weights": w, "arch": "cnn", "out": tmp_path / "o.safetensors", "device": "cpu",
            "dataset": "digits"}
    PurifyCommand(**base)
    for extra, message in (({"triggered": w}, "--triggered and --target go together"),
                           ({"params": "{}", "from_run": tmp_path}, "--params and --from-run"),
                           ({"holdout": 1.0}, "--holdout 1.0"),
                           ({"mean": "0.5"}, "--mean and --std go together"),
                           ({"dataset": "cifar10"}, "--data-root is required")):
        with pytest.raises(UsageError, match=message):
            PurifyCommand(**{**base, **extra})


def test_the_cli_error_is_one_line_in_a_subprocess(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "tuner", "purify", "--defense", "ft", "--weights",
                        str(tmp_path / "missing.safetensors"), "--arch", "cnn", "--dataset",
                        "digits", "--out", str(tmp_path / "p.safetensors")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert "--weights" in line and "missing.safetensors" in line and "cannot read" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# purify reproduces evaluate on a zoo victim (digits: the dataset's own split)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_purify_on_an_exported_victim_gives_evaluates_numbers(tmp_path: Path,
                                                              capsys: Any) -> None:
    splits = load_splits("digits")
    spec = ZooSpec("digits", attacks=("badnets",), recipe=Recipe(epochs=5, batch_size=64, lr=0.1),
                   zoo_dir=tmp_path / "zoo", device="cpu")
    (victim,) = get_victims(spec, splits=splits, progress=False)
    params = {"epochs": 2, "lr": 0.01}
    expected = run_config("fst", params, [victim], splits, seed=0, device="cpu")["badnets"]
    export([victim], tmp_path / "export", spec)
    out = tmp_path / "purified.safetensors"
    rc = purify("--defense", "fst", "--params", json.dumps(params), "--weights",
                str(tmp_path / "export" / "digits-badnets.safetensors"), "--arch", "cnn",
                "--dataset", "digits", "--triggered",
                str(tmp_path / "export" / "digits-badnets.triggered-test.npz"), "--target", "0",
                "--out", str(out), "--device", "cpu")
    assert rc == 0, capsys.readouterr().err
    card = json.loads(out.with_suffix(".json").read_text())
    after = {k: expected["after"][k] for k in ("acc", "asr", "ra")}
    assert card["metrics"]["after"] == after
    assert card["metrics"]["before"] == expected["before"]
    assert card["data"]["finetune_images"] == len(splits.clean)
    assert card["data"]["heldout_images"] == len(splits.test)
