"""BackdoorBench attack records as victims (``python -m tuner import-backdoorbench RECORD_DIR``).

A record is the folder an attack script of BackdoorBench (github.com/SCLBD/BackdoorBench)
writes through ``utils/save_load_attack.py:save_attack_result``::

    RECORD_DIR/attack_result.pt         torch.save of a dict (below)
    RECORD_DIR/bd_test_dataset/<label>/<index>.png
                                        the triggered test images, one folder per TRUE label,
                                        named by their index in the clean test set
    RECORD_DIR/bd_train_dataset/...     the poisoned training images (not used here)

``attack_result.pt`` holds ``model_name`` (e.g. ``preactresnet18``), ``num_classes``, ``model``
(the state_dict, ``module.``-prefixed under DataParallel), ``data_path`` (the attacker's data
folder, not used), ``img_size`` (``[H, W, C]``), ``clean_data`` (``cifar10``, ``gtsrb``,
``mnist``, ``tiny``, ...), ``bd_train`` (not used) and ``bd_test``: the state of
``utils/bd_dataset_v2.py:prepro_cls_DatasetBD_v2`` (``retrieve_state()``)::

    {"bd_data_container": {"save_folder_path": ".../bd_test_dataset",
                           "data_dict": {index: {"path": ".../<label>/<index>.png",
                                                 "other_info": [bd_label, label]}},
                           "save_file_format": ".png"},
     "getitem_all": bool, "getitem_all_switch": bool,
     "original_index_array": ndarray (the indices in the set),
     "poison_indicator": ndarray (1 where the image is triggered),
     "save_folder_path": ".../bd_test_dataset"}

Safety: the pickle is read with ``torch.load(weights_only=True)`` and, besides torch's own
tensors and ``OrderedDict``, only the globals a real record names: numpy's ``ndarray``,
``dtype`` and the classes of the int32, int64 and float64 dtypes, ``_reconstruct`` (the two
arrays) and ``scalar`` (numpy integers as indices and labels), under numpy 1's
(``numpy.core``) and numpy 2's (``numpy._core``) module names.
Anything else (a record kept in RAM mode, which pickles PIL images; a crafted pickle) is
refused with one line, "not a plain BackdoorBench record: ...", before any of it runs. The
paths stored in the record (the attacker's machine's) are never opened: images are read from
``RECORD_DIR/<folder>/<label>/<index>.png``, ``<folder>`` the last part of the stored folder,
and the stored path must end the same way.

The victim: BackdoorBench's ``model_name`` is the arch (``preactresnet18`` is this zoo's
``preact-resnet18``), its dataset's normalization (BackdoorBench's
``get_dataset_normalization``) the model's input normalization, the one ``bd_label`` of every
triggered image the target (all-to-all records are refused), ``label`` the true label.
"""

from __future__ import annotations

import datetime as _dt
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.data import DATASETS, DatasetInfo, Split, dataset_info
from zoo.external import (
    MAX_FILE_BYTES,
    ExternalError,
    check_name,
    fit_state_dict,
    put_external,
    read_image,
    read_regular,
    sha256,
    split_sha256,
    state_sha256,
    strip_module_prefix,
    unpickling_reason,
)
from zoo.models import ARCHS
from zoo.store import Entry, Store

__all__ = ["PREFIX", "Record", "RecordError", "import_record", "read_record"]

PREFIX = "bb:"  # victims imported from BackdoorBench are named bb:NAME
RECORD_FILE = "attack_result.pt"
_REQUIRED = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data",
             "bd_train", "bd_test")

# BackdoorBench's names -> this tool's: the dataset the clean data comes from, and the model's
# input normalization (BackdoorBench's get_dataset_normalization). Datasets this tool has no
# reader for are read as image folders (--dataset imagefolder).
_CIFAR = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
BB_DATASETS: dict[str, tuple[str, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "cifar10": ("cifar10", _CIFAR),
    "mnist": ("mnist", ((0.5,), (0.5,))),
    "gtsrb": ("gtsrb", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
    "celeba": ("imagefolder", ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
    "cifar100": ("imagefolder", ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "tiny": ("imagefolder", ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262))),
    "imagenet": ("imagefolder", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
}
# BackdoorBench's model names that this zoo spells differently (its spelling is used where it
# is registered, so a victim's arch is the same whether or not BackdoorBench's is an alias).
BB_ARCHS = {"preactresnet18": "preact-resnet18"}


class RecordError(ExternalError):
    """A folder that is not a plain BackdoorBench attack record (one line)."""


def _refuse(path: Path, problem: str) -> RecordError:
    return RecordError(f"not a plain BackdoorBench record: {path}: {problem}")


@dataclass(frozen=True)
class Record:
    """What an attack record holds, checked, with the triggered test images read."""

    path: Path
    model_name: str
    arch: str
    clean_data: str
    dataset: str
    num_classes: int
    img_size: tuple[int, int, int]  # H, W, C as BackdoorBench writes it
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target: int
    sha256: str  # of attack_result.pt
    folder: str  # the triggered images' folder in the record
    skipped: dict[str, int]
    state: dict[str, torch.Tensor] = field(repr=False)
    triggered: Split = field(repr=False)

    def info(self) -> DatasetInfo:
        """The images' facts, with the model's own normalization."""
        h, _, c = self.img_size
        if self.dataset != "imagefolder":
            base = dataset_info(self.dataset)
            return DatasetInfo(base.name, c, h, self.num_classes, self.mean, self.std,
                               base.hflip, base.pad)
        return DatasetInfo("imagefolder", c, h, self.num_classes, self.mean, self.std,
                           hflip=False, pad=max(1, h // 8))


# ---------------------------------------------------------------------------------------------
# Reading the pickle
# ---------------------------------------------------------------------------------------------


def safe_globals() -> list[Any]:
    """The numpy globals a real record names (see the module docstring); nothing else."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: list[Any] = [np.ndarray, np.dtype]
    # numpy >= 1.25 rebuilds a dtype as an instance of its class (numpy.dtypes.Int64DType): the
    # classes of the dtypes a record holds (int64 indices, int32 where numpy's default integer
    # is 32-bit, float64 poison_indicator).
    allowed += list(dict.fromkeys(type(np.dtype(t)) for t in ("int32", "int64", "float64")))
    for core in ("numpy.core", "numpy._core"):
        allowed += [(reconstruct, f"{core}.multiarray._reconstruct"),
                    (scalar, f"{core}.multiarray.scalar")]
    return allowed


def _load(path: Path) -> tuple[dict[str, Any], str]:
    """(the record's dict, the file's sha256)."""
    data = read_regular(path, what="BackdoorBench record", max_bytes=MAX_FILE_BYTES)
    try:
        with torch.serialization.safe_globals(safe_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, TypeError,
            AttributeError, ImportError, IndexError, KeyError, MemoryError) as exc:
        raise _refuse(path, unpickling_reason(exc)) from None
    if not isinstance(obj, dict):
        raise _refuse(path, f"holds a {type(obj).__name__}: expected a dict")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise _refuse(path, f"lacks {', '.join(missing)}: expected the keys of "
                            "save_attack_result")
    return obj, sha256(data)


def _int(value: Any, path: Path, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _refuse(path, f"{what} is {type(value).__name__}: expected an integer")
    return int(value)


def _ints(value: Any, path: Path, what: str) -> np.ndarray:
    arr = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iuf" or \
            not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
        raise _refuse(path, f"{what}: expected a 1-d array of whole numbers")
    return arr.astype(np.int64)


def _arch(model_name: Any, path: Path) -> str:
    if not isinstance(model_name, str):
        raise _refuse(path, f"model_name is {type(model_name).__name__}: expected a str")
    arch = BB_ARCHS.get(model_name, model_name)  # this zoo's spelling first
    if arch in ARCHS:
        return arch
    if model_name in ARCHS:
        return model_name
    raise RecordError(f"BackdoorBench record {path}: model {model_name!r} is not a "
                      f"registered arch: expected one of {', '.join(ARCHS)}")


def _dataset(clean_data: Any, path: Path) -> tuple[str, tuple[tuple[float, ...], ...]]:
    if not isinstance(clean_data, str):
        raise _refuse(path, f"clean_data is {type(clean_data).__name__}: expected a str")
    if clean_data in BB_DATASETS:
        return BB_DATASETS[clean_data]
    if clean_data in DATASETS and clean_data != "imagefolder":  # one of this tool's own
        info = dataset_info(clean_data)
        return clean_data, (info.mean, info.std)
    raise RecordError(f"BackdoorBench record {path}: clean_data {clean_data!r}: expected one of "
                      f"{', '.join(sorted({*BB_DATASETS, *DATASETS} - {'imagefolder'}))}")


def _img_size(value: Any, path: Path) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _refuse(path, f"img_size {value!r}: expected [height, width, channels]")
    h, w, c = (_int(v, path, "img_size") for v in value)
    if h != w or h < 1 or c not in (1, 3):
        raise RecordError(f"BackdoorBench record {path}: img_size {[h, w, c]}: expected square "
                          "images with 1 or 3 channels")
    return h, w, c


# ---------------------------------------------------------------------------------------------
# The triggered test images
# ---------------------------------------------------------------------------------------------


def _bd_test(record_dir: Path, bd: Any, path: Path, img_size: tuple[int, int, int],
             num_classes: int) -> tuple[Split, int, str, dict[str, int]]:
    """(triggered non-target images with TRUE labels, target, folder name, skipped counts)."""
    if not isinstance(bd, dict) or not isinstance(bd.get("bd_data_container"), dict):
        raise _refuse(path, "bd_test: expected the state of prepro_cls_DatasetBD_v2 (a dict "
                            "with 'bd_data_container')")
    box = bd["bd_data_container"]
    folder_path, fmt, table = (box.get(k) for k in ("save_folder_path", "save_file_format",
                                                    "data_dict"))
    if not isinstance(folder_path, str) or not isinstance(table, dict):
        raise _refuse(path, "bd_test holds its images in the pickle (RAM mode) or no "
                            "data_dict: expected a record saved with a bd_test_dataset folder")
    if fmt != ".png":
        raise _refuse(path, f"bd_test save_file_format {fmt!r}: expected '.png'")
    name = Path(folder_path.replace("\\", "/")).name
    check_name(name, f"BackdoorBench record {path}: bd_test folder")
    folder = record_dir / name
    if not folder.is_dir() or folder.is_symlink():
        raise RecordError(f"BackdoorBench record {record_dir}: no folder {name}/ of triggered "
                          "test images (bd_test_dataset/<label>/<index>.png)")
    index = _ints(bd.get("original_index_array"), path, "bd_test original_index_array")
    flags = _ints(bd.get("poison_indicator"), path, "bd_test poison_indicator")
    entries = {_int(k, path, "bd_test data_dict key"): v for k, v in table.items()}
    h, _, c = img_size
    xs, ys, bd_labels = [], [], set()
    skipped = {"clean": 0, "target_class": 0}
    for i in index.tolist():
        if not 0 <= i < len(flags) or flags[i] != 1:
            skipped["clean"] += 1  # a clean image of the test set: not part of the ASR set
            continue
        entry = entries.get(i)
        stored = entry.get("path") if isinstance(entry, dict) else None
        info = entry.get("other_info") if isinstance(entry, dict) else None
        if not isinstance(info, (list, tuple)) or len(info) < 2 or not isinstance(stored, str):
            raise _refuse(path, f"bd_test data_dict[{i}]: expected {{'path': str, "
                                "'other_info': [bd_label, label]}")
        bd_label, label = (_int(v, path, f"bd_test data_dict[{i}] label") for v in info[:2])
        if not (0 <= bd_label < num_classes and 0 <= label < num_classes):
            raise _refuse(path, f"bd_test data_dict[{i}]: labels {bd_label}, {label}: expected "
                                f"0..{num_classes - 1}")
        tail = f"{label}/{i}{fmt}"
        if not stored.replace("\\", "/").endswith(f"/{tail}"):
            raise _refuse(path, f"bd_test data_dict[{i}] path {stored[-80:]!r}: expected "
                                f"it to end in {tail}")
        bd_labels.add(bd_label)
        xs.append(folder / str(label) / f"{i}{fmt}")
        ys.append(label)
    if len(bd_labels) != 1:
        kind = "no triggered images" if not bd_labels else \
            f"{len(bd_labels)} backdoor labels (all-to-all)"
        raise RecordError(f"BackdoorBench record {record_dir}: bd_test has {kind}: expected an "
                          "all-to-one attack (one target class)")
    (target,) = bd_labels
    keep = [j for j, y in enumerate(ys) if y != target]
    skipped["target_class"] = len(ys) - len(keep)
    images = []
    for j in keep:
        file = xs[j]
        if file.is_symlink() or not file.is_file():
            raise RecordError(f"BackdoorBench record {record_dir}: missing triggered image "
                              f"{file.relative_to(record_dir)}")
        images.append(read_image(file, c, h, resize=False))
    if not images:
        raise RecordError(f"BackdoorBench record {record_dir}: no triggered image of a "
                          "non-target class")
    split = Split(torch.from_numpy(np.stack(images)),
                  torch.tensor([ys[j] for j in keep], dtype=torch.long))
    return split, target, name, skipped


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def read_record(record_dir: Path) -> Record:
    """Read and check a record folder; RecordError (one line) on anything unexpected."""
    record_dir = Path(record_dir).expanduser().absolute()
    path = record_dir / RECORD_FILE
    if not record_dir.is_dir():
        raise RecordError(f"BackdoorBench record {record_dir}: not a folder: expected the record "
                          f"folder holding {RECORD_FILE} and bd_test_dataset/")
    if not path.is_file():
        raise RecordError(f"BackdoorBench record {record_dir}: no {RECORD_FILE}")
    obj, digest = _load(path)
    arch = _arch(obj["model_name"], path)
    dataset, (mean, std) = _dataset(obj["clean_data"], path)
    num_classes = _int(obj["num_classes"], path, "num_classes")
    if num_classes < 2:
        raise _refuse(path, f"num_classes {num_classes}: expected at least 2")
    img_size = _img_size(obj["img_size"], path)
    model = obj["model"]
    if not isinstance(model, Mapping) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise _refuse(path, "model: expected a state_dict (tensor names to tensors)")
    if dataset != "imagefolder":
        base = dataset_info(dataset)
        if (base.size, base.channels, base.num_classes) != (img_size[0], img_size[2], num_classes):
            raise RecordError(
                f"BackdoorBench record {path}: img_size {list(img_size)} and num_classes "
                f"{num_classes} disagree with {dataset} ({base.size}x{base.size}x{base.channels}, "
                f"{base.num_classes} classes)")
    triggered, target, folder, skipped = _bd_test(record_dir, obj["bd_test"], path, img_size,
                                                  num_classes)
    return Record(path=record_dir, model_name=str(obj["model_name"]), arch=arch,
                  clean_data=str(obj["clean_data"]), dataset=dataset, num_classes=num_classes,
                  img_size=img_size, mean=tuple(mean), std=tuple(std), target=target,
                  sha256=digest, folder=folder,
                  skipped=skipped, state=strip_module_prefix(dict(model)), triggered=triggered)


def default_name(record_dir: Path) -> str:
    """The record folder's name, made a valid victim name."""
    name = "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in Path(record_dir).name)
    return name.lstrip("._-")[:64] or "record"


def import_record(record_dir: Path, store: Store, name: str | None = None
                  ) -> tuple[str, Entry, Record]:
    """Read the record at ``record_dir`` and keep it in ``store`` as victim ``bb:NAME``
    (``name`` defaults to the folder's name). Returns ``(label, entry, record)``."""
    name = check_name(default_name(record_dir) if name is None else name, "--name")
    record = read_record(record_dir)
    info = record.info()
    state, renamed = fit_state_dict(record.state, record.arch, info,
                                    where=f"BackdoorBench record {record.path / RECORD_FILE}")
    label = PREFIX + name
    description = {
        "source": "backdoorbench", "arch": record.arch, "dataset": record.dataset,
        "channels": info.channels, "size": info.size, "num_classes": record.num_classes,
        "mean": list(record.mean), "std": list(record.std), "target": record.target,
        "weights_sha256": state_sha256(state), "triggered": "split",
        "triggered_sha256": split_sha256(record.triggered),
    }
    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "origin": {"record": str(record.path), "attack_result_sha256": record.sha256,
                   "model_name": record.model_name, "clean_data": record.clean_data,
                   "img_size": list(record.img_size), "bd_test_folder": record.folder,
                   "triggered_images": len(record.triggered), "skipped": record.skipped,
                   "renamed_by_position": renamed},
    }
    groups = {"model": state, "triggered": {"x": record.triggered.x, "y": record.triggered.y}}
    entry = put_external(store, description, groups, meta, label=label)
    return label, entry, record
