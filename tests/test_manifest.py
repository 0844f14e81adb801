"""Victims trained anywhere: the ``--victims FILE.yaml`` manifest (zoo/manifest.py), its store
entries, and ``python -m tuner zoo --export`` writing one (the round trip)."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from tuner.cmd_zoo import export
from tuner.evaluation import run_config
from tuner.spec import victims_default
from zoo.attacks import make_attack
from zoo.data import DataError, load_splits
from zoo.manifest import ManifestError, load_manifest
from zoo.models import build_model
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims

ROOT = Path(__file__).resolve().parents[1]


def tuner(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tuner", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_splits("digits")


def cnn_weights(info: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("cnn", info).state_dict()


def write_npz(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    buf = io.BytesIO()
    np.savez(buf, x=x.numpy(), y=y.numpy())
    path.write_bytes(buf.getvalue())
    return path


def write_files(root: Path, digits: Any) -> dict[str, Path]:
    """Weights (.safetensors and .pt), a triggered npz and the same set as a folder."""
    root.mkdir(parents=True, exist_ok=True)
    state = cnn_weights(digits.info)
    (root / "w.safetensors").write_bytes(save_safetensors(state))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
               root / "w.pt")
    bd = make_attack("badnets", digits.info).triggered(digits.test)
    write_npz(root / "bd.npz", bd.x, bd.y)
    for i, (img, label) in enumerate(zip(bd.x[:20], bd.y[:20], strict=True)):
        (root / "bd" / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(root / "bd" / str(int(label)) / f"{i}.png")
    return {"state": state, "bd": bd}  # type: ignore[dict-item]


def manifest(root: Path, *entries: str) -> Path:
    path = root / "victims.yaml"
    path.write_text("victims:\n" + "".join(entries))
    return path


VICTIM = ("  - name: mine\n    weights: w.safetensors\n    arch: cnn\n    num_classes: 10\n"
          "    target: 0\n    triggered: bd.npz\n")


def spec_for(path: Path, tmp_path: Path, *attacks: str, seed: int = 0) -> ZooSpec:
    names = attacks or tuple(v.name for v in load_manifest(path))
    return ZooSpec("digits", attacks=names, manifest=path, zoo_dir=tmp_path / "zoo",
                   device="cpu", seed=seed)


# ---------------------------------------------------------------------------------------------
# Loading victims
# ---------------------------------------------------------------------------------------------


def test_one_triggered_set_is_cut_into_seeded_halves(tmp_path: Path, digits: Any) -> None:
    files = write_files(tmp_path, digits)
    path = manifest(tmp_path, VICTIM)
    (v,) = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    assert (v.attack, v.source, v.arch, v.target, v.built) == ("mine", "manifest", "cnn", 0, False)
    bd = files["bd"]
    assert len(v.bd_val) + len(v.bd_test) == len(bd)
    assert abs(len(v.bd_val) - len(v.bd_test)) <= 10  # stratified halves
    for k, t in files["state"].items():
        assert torch.equal(v.state_dict[k], t)
    (again,) = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    assert torch.equal(again.bd_val.x, v.bd_val.x) and again.metrics == v.metrics
    (other,) = get_victims(spec_for(path, tmp_path, seed=1), splits=load_splits("digits", seed=1),
                           progress=False)
    assert not torch.equal(other.bd_val.y, v.bd_val.y)  # another seed, other halves


def test_pt_checkpoint_folder_halves_and_normalization(tmp_path: Path, digits: Any) -> None:
    files = write_files(tmp_path, digits)
    path = manifest(tmp_path, "  - name: halves\n    weights: w.pt\n    arch: cnn\n"
                    "    num_classes: 10\n    target: 0\n    dataset: digits\n"
                    "    normalization: {mean: [0.1307], std: [0.3081]}\n"
                    "    triggered: {val: bd, test: bd.npz}\n")
    (v,) = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    assert v.info.mean == (0.1307,) and v.info.std == (0.3081,) and v.info.pad == digits.info.pad
    assert len(v.bd_val) == 20 and torch.equal(v.bd_test.x, files["bd"].x)
    assert torch.equal(v.state_dict["head.weight"], files["state"]["head.weight"])


def test_a_builtin_attack_regenerates_the_trigger(tmp_path: Path, digits: Any) -> None:
    write_files(tmp_path, digits)
    path = manifest(tmp_path, "  - name: regen\n    weights: w.safetensors\n    arch: cnn\n"
                    "    num_classes: 10\n    target: 2\n"
                    "    attack: {name: badnets, params: {patch: 3, seed: 5}}\n")
    (v,) = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    attack = make_attack("badnets", digits.info, target=2, seed=5, patch=3)
    assert v.attack_obj is not None and v.attack_obj.params() == attack.params()
    assert torch.equal(v.bd_val.x, attack.triggered(digits.val).x)
    assert torch.equal(v.bd_test.y, attack.triggered(digits.test).y)


def test_search_and_evaluate_run_on_manifest_victims_unchanged(tmp_path: Path,
                                                               digits: Any) -> None:
    write_files(tmp_path, digits)
    path = manifest(tmp_path, VICTIM)
    victims = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    out = run_config("ft", {"epochs": 1}, victims, digits, seed=0, device="cpu")
    assert set(out) == {"mine"} and set(out["mine"]["after"]) == {"acc", "asr", "ra", "der"}


def test_with_victims_and_no_attacks_the_manifests_victims_are_used(tmp_path: Path,
                                                                    digits: Any) -> None:
    write_files(tmp_path, digits)
    path = manifest(tmp_path, VICTIM, VICTIM.replace("mine", "also"))
    zoo = ZooSpec("digits", manifest=path, zoo_dir=tmp_path / "zoo", device="cpu")
    assert victims_default(zoo, argparse.Namespace()).attacks == ("mine", "also")
    given = argparse.Namespace(attacks=("badnets", "also"))
    chosen = dataclasses.replace(zoo, attacks=("badnets", "also"))
    assert victims_default(chosen, given).attacks == ("badnets", "also")
    with pytest.raises(DataError, match="'nope': not a built-in attack and not a victim of"):
        get_victims(dataclasses.replace(zoo, attacks=("nope",)), splits=digits, progress=False)
    with pytest.raises(DataError, match="unknown attack 'mine' in --attacks"):
        ZooSpec("digits", attacks=("mine",))  # a manifest's name needs --victims


# ---------------------------------------------------------------------------------------------
# Refused, one line naming the file, the victim and the key
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("victims:\n  - &a {name: x}\n  - *a\n", "invalid YAML.*aliases"),
    ("victims: []\nvictims: []\n", "invalid YAML.*given twice"),
    ("victimz: []\n", "top level .*expected one key, 'victims'"),
    (VICTIM.replace("arch: cnn", "arch: cnn\n    arch: cnn"), "invalid YAML.*'arch' is given"),
    (VICTIM.replace("name: mine", "name: badnets"), "victim 'badnets': name: .*built-in"),
    (VICTIM.replace("name: mine", "name: 'a/b'"), r"victims\[0\]: name 'a/b'"),
    (VICTIM + VICTIM, "victim 'mine': name: given twice"),
    (VICTIM.replace("    target: 0\n", ""), "victim 'mine': target: missing"),
    (VICTIM.replace("arch: cnn", "arch: vgg99"), "victim 'mine': arch = 'vgg99': expected"),
    (VICTIM.replace("target: 0", "target: 10"), "victim 'mine': target = 10: expected 0..9"),
    (VICTIM.replace("target: 0", "target: 0\n    colour: red"), "victim 'mine': 'colour': unknown"),
    (VICTIM.replace("w.safetensors", "missing.safetensors"), "victim 'mine': weights = .*cannot"),
    (VICTIM.replace("target: 0", "target: 0\n    attack: {name: badnets}"),
     "victim 'mine': triggered: expected exactly one"),
    (VICTIM.replace("triggered: bd.npz", "attack: {name: lf}"),
     "victim 'mine': attack.name = 'lf': expected an attack whose trigger needs no model"),
    (VICTIM.replace("target: 0", "target: 0\n    normalization: {mean: [0.5]}"),
     "victim 'mine': normalization = .*expected {mean"),
])
def test_bad_manifests_are_one_line(tmp_path: Path, digits: Any, text: str, message: str) -> None:
    write_files(tmp_path, digits)
    path = tmp_path / "victims.yaml"
    path.write_text(text if text.startswith("victim") else "victims:\n" + text)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_a_huge_or_special_manifest_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("victims: []\n" + "#" * (300 << 10))
    with pytest.raises(ManifestError, match="bytes: expected a manifest of at most"):
        load_manifest(big)
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(("change", "message"), [
    ("arch: preact-resnet18", "not a 'preact-resnet18' state_dict .*missing"),
    ("num_classes: 5", "num_classes = 5: the data has 10 classes"),
])
def test_weights_that_do_not_fit_are_refused(tmp_path: Path, digits: Any, change: str,
                                             message: str) -> None:
    write_files(tmp_path, digits)
    key = change.split(":")[0]
    old = {"arch": "arch: cnn", "num_classes": "num_classes: 10"}[key]
    path = manifest(tmp_path, VICTIM.replace(old, change).replace("target: 0", "target: 1"))
    with pytest.raises(DataError, match=message):
        get_victims(spec_for(path, tmp_path), splits=digits, progress=False)


def test_a_head_of_the_wrong_size_is_a_class_count_mismatch(tmp_path: Path, digits: Any) -> None:
    write_files(tmp_path, digits)
    small = build_model("cnn", dataclasses.replace(digits.info, num_classes=5)).state_dict()
    (tmp_path / "w.safetensors").write_bytes(save_safetensors(small))
    path = manifest(tmp_path, VICTIM)
    with pytest.raises(DataError, match=r"head \(head.weight\) has 5 classes: expected 10"):
        get_victims(spec_for(path, tmp_path), splits=digits, progress=False)


def test_pt_weights_that_would_run_code_are_refused(tmp_path: Path, digits: Any) -> None:
    write_files(tmp_path, digits)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": Evil()}, tmp_path / "w.pt")
    path = manifest(tmp_path, VICTIM.replace("w.safetensors", "w.pt"))
    with pytest.raises(DataError, match="not a plain state_dict file .*posix.system"):
        get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# zoo --export: the round trip
# ---------------------------------------------------------------------------------------------


def test_cli_lists_and_re_exports_manifest_victims(tmp_path: Path, digits: Any) -> None:
    write_files(tmp_path, digits)
    path = manifest(tmp_path, VICTIM)
    zoo = str(tmp_path / "zoo")
    r = tuner("zoo", "--victims", str(path), "--zoo-dir", zoo, "--device", "cpu", "--json",
              "--export", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(r.stdout)
    assert row["attack"] == "mine" and row["source"] == "manifest"
    again = tuner("zoo", "--victims", str(tmp_path / "out" / "victims.yaml"), "--zoo-dir", zoo,
                  "--device", "cpu", "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (back,) = json.loads(again.stdout)
    assert {k: back[k] for k in ("acc", "asr", "ra", "val_acc", "val_asr")} == \
        {k: row[k] for k in ("acc", "asr", "ra", "val_acc", "val_asr")}
    bad = tuner("zoo", "--victims", str(tmp_path / "nope.yaml"), "--zoo-dir", zoo, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.yaml" in bad.stderr


@pytest.mark.slow
def test_export_round_trip_gives_the_same_victim_and_numbers(tmp_path: Path, digits: Any) -> None:
    short = Recipe(epochs=3, batch_size=64, lr=0.1)
    spec = ZooSpec("digits", attacks=("badnets", "wanet"), recipe=short,
                   zoo_dir=tmp_path / "zoo", device="cpu")
    built = get_victims(spec, splits=digits, progress=False)
    path = export(built, tmp_path / "out", spec)
    doc = path.read_text()
    assert doc.startswith("# Victims exported by") and "digits-badnets.triggered-test.npz" in doc
    back = get_victims(spec_for(path, tmp_path), splits=digits, progress=False)
    assert [v.attack for v in back] == ["digits-badnets", "digits-wanet"]
    for b, v in zip(built, back, strict=True):
        assert v.target == b.target and v.arch == b.arch and v.info == b.info
        assert all(torch.equal(v.state_dict[k], t) for k, t in b.state_dict.items())
        assert torch.equal(v.bd_val.x, b.bd_val.x) and torch.equal(v.bd_test.y, b.bd_test.y)
        assert v.metrics == b.metrics
    a = run_config("ft", {"epochs": 1}, built, digits, seed=0, device="cpu")
    c = run_config("ft", {"epochs": 1}, back, digits, seed=0, device="cpu")
    for b, v in zip(built, back, strict=True):
        assert a[b.attack]["after"] == c[v.attack]["after"]
