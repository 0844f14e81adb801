"""BackdoorBench attack records as victims (zoo/backdoorbench.py, ``import-backdoorbench``).

The records here are written in BackdoorBench's exact layout (``utils/save_load_attack.py``:
``save_attack_result``; ``utils/bd_dataset_v2.py``: ``prepro_cls_DatasetBD_v2.retrieve_state``
and its ``bd_test_dataset/<label>/<index>.png`` folder): numpy index arrays and numpy-integer
keys, the attacker's relative paths, a ``preactresnet18`` state_dict under BackdoorBench's own
key names (``linear.*`` for the head).
"""

from __future__ import annotations

import collections
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

from zoo.attacks import make_attack
from zoo.backdoorbench import RecordError, import_record, read_record
from zoo.data import DataError, load_splits
from zoo.external import name_key
from zoo.models import build_model
from zoo.store import Store
from zoo.victims import ZooSpec, get_victims

ROOT = Path(__file__).resolve().parents[1]


def bb_state_dict(info: Any) -> collections.OrderedDict[str, torch.Tensor]:
    """A PreAct-ResNet18 state_dict under BackdoorBench's names (its head is ``linear``)."""
    model = build_model("preact-resnet18", info)
    return collections.OrderedDict(
        (k.replace("head.", "linear."), v) for k, v in model.state_dict().items())


def write_record(root: Path, name: str = "badnet_demo", *, n: int = 40, target: int = 0,
                 bd_train: Any = None, all_to_all: bool = False,
                 path_of: Any = None) -> Path:
    """A BackdoorBench record folder for a digits PreAct-ResNet18 with ``n`` triggered images."""
    record = root / name
    record.mkdir(parents=True)
    splits = load_splits("digits")
    labels = splits.test.y.numpy()
    chosen = np.flatnonzero(labels != target)[:n]
    images = make_attack("badnets", splits.info).apply(splits.test.x[chosen]).numpy()
    save_path = f"./record/{name}"
    data_dict = {}
    for i, img, label in zip(chosen, images, labels[chosen], strict=True):
        folder = record / "bd_test_dataset" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(folder / f"{i}.png")
        bd_label = (int(label) + 1) % 10 if all_to_all else target
        stored = (path_of or (lambda i, lab: f"{save_path}/bd_test_dataset/{lab}/{i}.png"))(
            i, int(label))
        data_dict[np.int64(i)] = {"path": stored, "other_info": [bd_label, int(label)]}
    indicator = np.zeros(len(labels))
    indicator[chosen] = 1
    bd_test = {
        "bd_data_container": {"save_folder_path": f"{save_path}/bd_test_dataset",
                              "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True, "getitem_all_switch": False,
        "original_index_array": np.arange(len(labels))[np.where(indicator == 1)[0]],
        "poison_indicator": indicator,
        "save_folder_path": f"{save_path}/bd_test_dataset",
    }
    torch.save({"model_name": "preactresnet18", "num_classes": 10,
                "model": bb_state_dict(splits.info), "data_path": "./data/digits",
                "img_size": [16, 16, 1], "clean_data": "digits", "bd_train": bd_train,
                "bd_test": bd_test}, record / "attack_result.pt")
    return record


class Evil:
    """A pickle that runs code when loaded: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def tuner(*argv: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tuner", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_a_record_is_read_with_true_labels_and_target(tmp_path: Path) -> None:
    record = read_record(write_record(tmp_path, n=30, target=3))
    assert (record.arch, record.dataset, record.num_classes, record.target) == (
        "preact-resnet18", "digits", 10, 3)
    assert record.mean == (0.5,) and record.folder == "bd_test_dataset"
    assert len(record.triggered) == 30 and record.triggered.x.shape[1:] == (1, 16, 16)
    labels = load_splits("digits").test.y.numpy()
    expected = labels[np.flatnonzero(labels != 3)[:30]]
    assert sorted(record.triggered.y.tolist()) == sorted(expected.tolist())  # true labels
    assert (record.triggered.y != 3).all()


def test_import_renames_by_position_and_get_victims_loads_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "zoo")
    record = write_record(tmp_path, n=40)
    label, entry, _ = import_record(record, store, "demo")
    ours = build_model("preact-resnet18", load_splits("digits").info).state_dict()
    renamed = set(ours) != set(bb_state_dict(load_splits("digits").info))
    assert label == "bb:demo" and entry.meta["origin"]["renamed_by_position"] == renamed
    spec = ZooSpec("digits", attacks=("bb:demo",), zoo_dir=tmp_path / "zoo", device="cpu")
    (v,) = get_victims(spec, progress=False)
    assert (v.attack, v.arch, v.source, v.target, v.built) == (
        "bb:demo", "preact-resnet18", "backdoorbench", 0, False)
    assert v.attack_obj is None and v.poison_rate is None
    assert len(v.bd_val) + len(v.bd_test) == 40 and abs(len(v.bd_val) - len(v.bd_test)) <= 10
    # the head loads under this zoo's name, with BackdoorBench's values
    bb = torch.load(record / "attack_result.pt", weights_only=False)["model"]
    assert torch.equal(v.model("cpu").head.weight.detach().cpu(), bb["linear.weight"])
    assert set(v.metrics) == {"val", "test"} and 0.0 <= v.metrics["test"].acc <= 100.0
    (again,) = get_victims(spec, progress=False)  # metrics measured once, then read
    assert again.metrics == v.metrics and torch.equal(again.bd_test.x, v.bd_test.x)


def test_an_unknown_or_mismatched_bb_victim_is_one_line(tmp_path: Path) -> None:
    spec = ZooSpec("digits", attacks=("bb:nope",), zoo_dir=tmp_path / "zoo", device="cpu")
    with pytest.raises(DataError, match="bb:nope is not in the victim store .*import-backd"):
        get_victims(spec, progress=False)
    store = Store(tmp_path / "zoo")
    import_record(write_record(tmp_path), store, "demo")
    meta = store.get(name_key("bb:demo")).meta
    store.put(name_key("bb:demo"), {}, {**meta, "dataset": "mnist", "size": 28})
    with pytest.raises(DataError, match="bb:demo was trained on mnist .*expected --dataset mnist"):
        get_victims(ZooSpec("digits", attacks=("bb:demo",), zoo_dir=tmp_path / "zoo",
                            device="cpu"), progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"all_to_all": True}, "all-to-one"),
    ({"path_of": lambda i, lab: f"/etc/passwd#{i}"}, "expected it to end in"),
])
def test_records_outside_the_supported_format_are_refused(tmp_path: Path, kwargs: dict,
                                                           message: str) -> None:
    with pytest.raises(RecordError, match=message):
        read_record(write_record(tmp_path, **kwargs))


def test_a_missing_image_is_named(tmp_path: Path) -> None:
    record = write_record(tmp_path, n=5)
    victim = next((record / "bd_test_dataset").rglob("*.png"))
    victim.unlink()
    with pytest.raises(RecordError, match="missing triggered image bd_test_dataset/"):
        read_record(record)


# ---------------------------------------------------------------------------------------------
# Safety: a pickle that would run code is refused before it runs
# ---------------------------------------------------------------------------------------------


def test_a_record_whose_pickle_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    record = write_record(tmp_path, bd_train=Evil(marker))
    with pytest.raises(RecordError, match=r"^not a plain BackdoorBench record: .*posix\.system"):
        read_record(record)
    assert not marker.exists()


def test_a_ram_mode_record_is_refused(tmp_path: Path) -> None:
    """BackdoorBench's in-RAM container pickles PIL images: not plain data."""
    record = write_record(tmp_path, n=3)
    obj = torch.load(record / "attack_result.pt", weights_only=False)
    box = obj["bd_test"]["bd_data_container"]
    box["save_folder_path"] = None
    box["data_dict"] = {k: (Image.new("L", (16, 16)), 0, 1) for k in box["data_dict"]}
    torch.save(obj, record / "attack_result.pt")
    with pytest.raises(RecordError, match="not a plain BackdoorBench record: .*PIL"):
        read_record(record)


def test_the_cli_refuses_the_malicious_record_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    record = write_record(tmp_path, bd_train=Evil(marker))
    r = tuner("import-backdoorbench", str(record), "--zoo-dir", str(tmp_path / "zoo"),
              cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: not a plain BackdoorBench record: ") and "posix.system" in line
    assert not marker.exists()
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())


# ---------------------------------------------------------------------------------------------
# End to end: import, then a smoke search on the imported victim
# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_import_then_smoke_search_on_the_record(tmp_path: Path) -> None:
    record = write_record(tmp_path, "badnet_demo", n=40)
    zoo = str(tmp_path / "zoo")
    r = tuner("import-backdoorbench", str(record), "--zoo-dir", zoo, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported bb:badnet_demo: preactresnet18 as preact-resnet18" in r.stdout
    r = tuner("--defense", "ft", "--smoke-test", "--attacks", "bb:badnet_demo", "--zoo-dir", zoo,
              "--output", str(tmp_path / "runs"), "--name", "smoke", cwd=tmp_path, timeout=880)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["attacks"] == ["bb:badnet_demo"] and summary["num_trials"] == 2
    final = json.loads((run / "final.json").read_text())
    assert set(final["no_defense"]["runs"][0]["per_attack"]) == {"bb:badnet_demo"}
    assert final["best"]["runs"][0]["per_attack"]["bb:badnet_demo"]["after"]["acc"] >= 0.0
    assert "bb:badnet\\_demo" in (run / "report.md").read_text()  # Markdown-escaped
