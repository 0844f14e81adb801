"""Readers for datasets kept on disk under ``--data-root``.

Each reader has the signature ``read_X(root: Path | None, download: bool) -> RawData`` and
returns uint8 N x C x H x W images with int64 labels (see :class:`zoo.data.RawData`). A missing
root, a missing file or a malformed file raises :class:`zoo.data.DataError` with one line that
names the root and the layout expected. Layouts (ROOT is ``--data-root``):

``mnist``
    The four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``),
    in ``ROOT/MNIST/raw/`` (torchvision's layout) or directly in ``ROOT/``. 1 x 28 x 28.
``cifar10``
    ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}``, the official python pickles.
    They are read with a restricted unpickler that resolves only numpy's array reconstruction
    globals, so a crafted file cannot run code. 3 x 32 x 32.
``gtsrb``
    The official layout, with ROOT either the folder holding ``GTSRB/`` or ``GTSRB/`` itself:
    ``GTSRB/Final_Training/Images/<00000..00042>/*.ppm`` with ``GT-<class>.csv`` in each class
    folder, ``GTSRB/Final_Test/Images/*.ppm``, and the labelled test CSV ``GT-final_test.csv``
    (from GTSRB_Final_Test_GT.zip) in ``GTSRB/Final_Test/Images/``, ``GTSRB/`` or ROOT.
    torchvision's download layout (``ROOT/gtsrb/GTSRB/Training/...``) is read too. The CSVs are
    semicolon-separated with the header ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;
    ClassId``. Whole images (no ROI crop, as BackdoorBench) are resized bilinearly to 32 x 32.
``imagefolder``
    ``ROOT/train/<class>/**/*.{png,jpg,jpeg,ppm,bmp}`` and ``ROOT/test/<class>/...`` (or
    ``ROOT/val/<class>/...``). Class indices are the sorted train folder names; test classes
    must be a subset of them. ``test/`` is used when every folder in it names a train class,
    else ``val/``. Images are converted to RGB and resized to S x S, S = min(height, width) of
    the first train image. Tiny-ImageNet works as unpacked: images are found below each class
    folder (its ``train/<wnid>/images/``), and ``val/`` is read either regrouped per class
    (``val/<wnid>/*.JPEG``) or as shipped (``val/images/`` + ``val/val_annotations.txt``); its
    unlabelled ``test/`` is skipped by the rule above.

``download=True`` uses torchvision's downloaders (mnist, cifar10, gtsrb) when torchvision is
installed; otherwise the files must be placed by hand as above.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["DataError", "RawData", "read_cifar10", "read_gtsrb", "read_imagefolder", "read_mnist"]


class DataError(ValueError):
    """A dataset that cannot be read: a missing root, a malformed file, a bad ratio."""


@dataclass(frozen=True)
class RawData:
    """What a source reader returns before splitting (``zoo.data.load_splits`` splits it)."""

    x_train: np.ndarray  # uint8 N x C x H x W
    y_train: np.ndarray  # int64 N
    x_test: np.ndarray
    y_test: np.ndarray


class _Malformed(ValueError):
    """A file that exists but does not hold what its format promises (internal)."""


def _error(name: str, root: Path | None, problem: str, layout: str) -> DataError:
    where = "no --data-root given" if root is None else f"data root {root}"
    return DataError(f"{name}: {problem} ({where}); expected {layout}")


def _require_root(name: str, root: Path | None, layout: str) -> Path:
    if root is None:
        raise _error(name, root, "needs --data-root DIR", layout)
    if not root.is_dir():
        raise _error(name, root, "data root is not a directory", layout)
    return root


def _find(name: str, root: Path | None, download: bool, layout: str, find: Callable[[Path], Any],
          fetch: Callable[[Any, str], None], missing: str) -> tuple[Path, Any]:
    """``(root, find(root))``, downloading first when asked and not found; one-line errors."""
    if download and (root is None or find(root) is None):
        _download(name, root, layout, fetch)
    root = _require_root(name, root, layout)
    found = find(root)
    if found is None:
        raise _error(name, root, missing, layout)
    return root, found


def _download(name: str, root: Path | None, layout: str, fetch: Callable[[Any, str], None]) -> None:
    """Fetch ``name`` into ``root`` with torchvision's downloaders."""
    if root is None:
        raise _error(name, root, "--download needs --data-root DIR to download into", layout)
    # ~1 s to import: only when a download is asked for
    import torchvision.datasets as tvd  # type: ignore[import-untyped]

    root.mkdir(parents=True, exist_ok=True)
    fetch(tvd, str(root))


# ---------------------------------------------------------------------------------------------
# MNIST: IDX files
# ---------------------------------------------------------------------------------------------

_MNIST_LAYOUT = (
    "ROOT/MNIST/raw/ or ROOT/ holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each plain or .gz)"
)
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: 0x0803 (ubyte, 3 dims), 0x0801 (1 dim)


def _find_plain_or_gz(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _mnist_files(root: Path) -> list[Path] | None:
    for folder in (root / "MNIST" / "raw", root):
        found = [_find_plain_or_gz(folder, n) for n in _MNIST_FILES]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
    return None


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise _Malformed(f"{path.name} is not a complete gzip file ({exc})") from None


def _parse_idx(data: bytes, *, magic: int, ndim: int) -> np.ndarray:
    """An IDX ubyte array from ``data``, checking magic number, dimensions and byte count."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _Malformed(f"IDX header truncated: {len(data)} bytes, expected at least {header}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise _Malformed(f"IDX magic number {found}, expected {magic}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise _Malformed(f"IDX of shape {dims} has {len(data)} bytes, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = _parse_idx(_read_bytes(images), magic=_IDX_IMAGES, ndim=3)
    except _Malformed as exc:
        raise _Malformed(f"{images.name}: {exc}") from None
    try:
        y = _parse_idx(_read_bytes(labels), magic=_IDX_LABELS, ndim=1)
    except _Malformed as exc:
        raise _Malformed(f"{labels.name}: {exc}") from None
    if x.shape[1:] != (28, 28):
        raise _Malformed(f"{images.name} holds {x.shape[1]}x{x.shape[2]} images, expected 28x28")
    if len(x) != len(y):
        raise _Malformed(f"{images.name} has {len(x)} images but {labels.name} {len(y)} labels")
    if len(y) and int(y.max()) > 9:
        raise _Malformed(f"{labels.name} holds label {int(y.max())}, expected 0..9")
    return x[:, None].copy(), y.astype(np.int64)


def read_mnist(root: Path | None, download: bool) -> RawData:
    """MNIST from its IDX files (plain or gzipped), 1 x 28 x 28."""
    root, files = _find("mnist", root, download, _MNIST_LAYOUT, _mnist_files, _fetch_mnist,
                        "IDX files not found")
    try:
        x_train, y_train = _mnist_pair(files[0], files[1])
        x_test, y_test = _mnist_pair(files[2], files[3])
    except _Malformed as exc:
        raise _error("mnist", root, str(exc), _MNIST_LAYOUT) from None
    return RawData(x_train, y_train, x_test, y_test)


def _fetch_mnist(tvd: Any, root: str) -> None:
    for train in (True, False):
        tvd.MNIST(root, train=train, download=True)


# ---------------------------------------------------------------------------------------------
# CIFAR-10: python pickles, read without running code
# ---------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = "ROOT/cifar-10-batches-py/ holding data_batch_1..data_batch_5 and test_batch"
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _latin1_encode(obj: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes at protocols 0-2; only latin-1 is allowed."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy's array and dtype reconstruction."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves numpy array globals and refuses every other global."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as (N x 3 x 32 x 32 uint8, N int64), never executing pickled code."""
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f).load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as exc:
        raise _Malformed(f"{path.name} is not a CIFAR pickle ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise _Malformed(f"{path.name} lacks the keys b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise _Malformed(f"{path.name} b'data' is {shape}, expected N x 3072 uint8")
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError):
        y = np.empty(0, dtype=object)
    if y.dtype.kind not in "iu" or y.shape != (len(data),):
        raise _Malformed(f"{path.name} b'labels' is not {len(data)} integers")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
        raise _Malformed(f"{path.name} holds a label outside 0..9")
    return data.reshape(-1, 3, 32, 32).copy(), y.astype(np.int64)


def read_cifar10(root: Path | None, download: bool) -> RawData:
    """CIFAR-10 from the python batches, 3 x 32 x 32."""
    names = (*_CIFAR_BATCHES, "test_batch")
    folder = None if root is None else root / "cifar-10-batches-py"
    if download and (folder is None or not all((folder / n).is_file() for n in names)):
        _download("cifar10", root, _CIFAR_LAYOUT, _fetch_cifar10)
    root = _require_root("cifar10", root, _CIFAR_LAYOUT)
    folder = root / "cifar-10-batches-py"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _error("cifar10", root, f"missing {', '.join(missing)}", _CIFAR_LAYOUT)
    try:
        parts = [_load_cifar_batch(folder / n) for n in _CIFAR_BATCHES]
        x_test, y_test = _load_cifar_batch(folder / "test_batch")
    except _Malformed as exc:
        raise _error("cifar10", root, str(exc), _CIFAR_LAYOUT) from None
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return RawData(x_train, y_train, x_test, y_test)


def _fetch_cifar10(tvd: Any, root: str) -> None:
    tvd.CIFAR10(root, train=True, download=True)


# ---------------------------------------------------------------------------------------------
# Images from files (GTSRB, image folders)
# ---------------------------------------------------------------------------------------------


def _load_image(path: Path, size: int | None = None) -> np.ndarray:
    """An RGB image as 3 x H x W uint8, resized bilinearly to size x size if given."""

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _Malformed(f"cannot read image {path} ({exc})") from None


def _image_size(path: Path) -> tuple[int, int]:

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise _Malformed(f"cannot read image {path} ({exc})") from None


def _stack(paths: list[Path], size: int) -> np.ndarray:
    x = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        x[i] = _load_image(path, size)
    return x


# ---------------------------------------------------------------------------------------------
# GTSRB
# ---------------------------------------------------------------------------------------------

_GTSRB_LAYOUT = (
    "ROOT/GTSRB/ (or ROOT itself) holding Final_Training/Images/<00000..00042>/*.ppm with "
    "GT-<class>.csv per class folder, Final_Test/Images/*.ppm, and GT-final_test.csv in "
    "GTSRB/Final_Test/Images/, GTSRB/ or ROOT/ (CSV: Filename;Width;Height;Roi.X1;Roi.Y1;"
    "Roi.X2;Roi.Y2;ClassId)"
)
_GTSRB_CLASSES = 43
_GTSRB_SIZE = 32


def _gtsrb_train_dir(base: Path) -> Path | None:
    for folder in (base / "Final_Training" / "Images", base / "Training"):
        if folder.is_dir():
            return folder
    return None


def _gtsrb_base(root: Path) -> Path | None:
    for base in (root / "GTSRB", root / "gtsrb" / "GTSRB", root):
        if _gtsrb_train_dir(base) is not None:
            return base
    return None


def _gtsrb_test_csv(root: Path, base: Path) -> Path | None:
    images = base / "Final_Test" / "Images"
    for path in (
        images / "GT-final_test.csv",
        base / "GT-final_test.csv",
        base.parent / "GT-final_test.csv",
        root / "GT-final_test.csv",
    ):
        if path.is_file():
            return path
    return None


def _parse_gtsrb_csv(path: Path) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a GTSRB annotation CSV (semicolon-separated, with header)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=";")
            fields = reader.fieldnames or []
            if "Filename" not in fields or "ClassId" not in fields:
                raise _Malformed(f"{path} has header {fields}, expected Filename;...;ClassId")
            rows = [(row["Filename"], row["ClassId"]) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _Malformed(f"{path} is not a GTSRB CSV ({exc})") from None
    out = []
    for line, (name, cls) in enumerate(rows, start=2):
        try:
            label = int(cls)
        except (TypeError, ValueError):
            label = -1
        if not name or not 0 <= label < _GTSRB_CLASSES:
            raise _Malformed(
                f"{path} line {line}: bad row ({name!r}, ClassId {cls!r}), "
                f"expected a file name and a ClassId in 0..{_GTSRB_CLASSES - 1}"
            )
        out.append((name, label))
    return out


def _gtsrb_listed(csv_path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for name, label in _parse_gtsrb_csv(csv_path):
        path = folder / name
        if not path.is_file():
            raise _Malformed(f"{csv_path} lists {name}, which is not in {folder}")
        paths.append(path)
        labels.append(label)
    return paths, labels


def _gtsrb_train(train_dir: Path) -> tuple[list[Path], list[int]]:
    classes = sorted(d for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise _Malformed(f"{train_dir} has no class folders")
    paths: list[Path] = []
    labels: list[int] = []
    for folder in classes:
        csv_path = folder / f"GT-{folder.name}.csv"
        if not csv_path.is_file():
            raise _Malformed(f"missing {csv_path}")
        p, y = _gtsrb_listed(csv_path, folder)
        paths += p
        labels += y
    return paths, labels


def read_gtsrb(root: Path | None, download: bool) -> RawData:
    """GTSRB from the official folders and CSVs, whole images resized to 3 x 32 x 32."""
    root, base = _find("gtsrb", root, download, _GTSRB_LAYOUT, _gtsrb_base, _fetch_gtsrb,
                       "training folder not found")
    test_csv = _gtsrb_test_csv(root, base)
    if test_csv is None:
        raise _error("gtsrb", root, "GT-final_test.csv not found", _GTSRB_LAYOUT)
    train_dir = _gtsrb_train_dir(base)
    assert train_dir is not None  # _gtsrb_base checked it
    try:
        train_paths, y_train = _gtsrb_train(train_dir)
        test_paths, y_test = _gtsrb_listed(test_csv, base / "Final_Test" / "Images")
        x_train = _stack(train_paths, _GTSRB_SIZE)
        x_test = _stack(test_paths, _GTSRB_SIZE)
    except _Malformed as exc:
        raise _error("gtsrb", root, str(exc), _GTSRB_LAYOUT) from None
    return RawData(x_train, np.array(y_train, np.int64), x_test, np.array(y_test, np.int64))


def _fetch_gtsrb(tvd: Any, root: str) -> None:
    for split in ("train", "test"):
        tvd.GTSRB(root, split=split, download=True)


# ---------------------------------------------------------------------------------------------
# Image folders (Tiny-ImageNet and the like)
# ---------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = (
    "ROOT/train/<class>/*.{png,jpg,jpeg,ppm,bmp} and ROOT/test/<class>/* or ROOT/val/<class>/* "
    "(Tiny-ImageNet: val/images/ with val/val_annotations.txt also works)"
)
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    return {d.name: _images_below(d) for d in sorted(split_dir.iterdir()) if d.is_dir()}


def _annotated_val(val_dir: Path) -> dict[str, list[Path]]:
    """Tiny-ImageNet's shipped val/: images/ plus val_annotations.txt (file<TAB>class<TAB>...)."""
    groups: dict[str, list[Path]] = {}
    ann = val_dir / "val_annotations.txt"
    for line_no, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        path = val_dir / "images" / parts[0]
        if len(parts) < 2 or not path.is_file():
            raise _Malformed(
                f"{ann} line {line_no}: expected an existing file in "
                f"{val_dir / 'images'} and a class, tab-separated"
            )
        groups.setdefault(parts[1], []).append(path)
    return groups


def _test_groups(root: Path, classes: set[str]) -> dict[str, list[Path]]:
    """The labelled test images: test/ if its folders are all train classes, else val/."""
    test_dir, val_dir = root / "test", root / "val"
    if test_dir.is_dir():
        groups = _class_folders(test_dir)
        if groups and set(groups) <= classes:
            return groups
    if (val_dir / "val_annotations.txt").is_file():
        groups = _annotated_val(val_dir)
    elif val_dir.is_dir():
        groups = _class_folders(val_dir)
    else:
        raise _Malformed("no usable test/ or val/ folder")
    unknown = sorted(set(groups) - classes)
    if unknown:
        raise _Malformed(f"val classes {unknown[:3]} are not train classes")
    return groups


def _flatten(groups: dict[str, list[Path]], index: dict[str, int]) -> tuple[list[Path], np.ndarray]:
    paths = [p for name in sorted(groups) for p in groups[name]]
    labels = [index[name] for name in sorted(groups) for _ in groups[name]]
    return paths, np.array(labels, dtype=np.int64)


def read_imagefolder(root: Path | None, download: bool) -> RawData:
    """One folder per class under ``train/`` and ``test/`` (or ``val/``), as RGB S x S."""
    if download:
        raise _error(
            "imagefolder",
            root,
            "--download is not available for image folders; arrange the files by hand",
            _FOLDER_LAYOUT,
        )
    root = _require_root("imagefolder", root, _FOLDER_LAYOUT)
    if not (root / "train").is_dir():
        raise _error("imagefolder", root, "train/ folder not found", _FOLDER_LAYOUT)
    try:
        train = _class_folders(root / "train")
        empty = [name for name, paths in train.items() if not paths]
        if not train or empty:
            raise _Malformed(f"train/ has no class folders with images (empty: {empty[:3]})")
        index = {name: i for i, name in enumerate(sorted(train))}
        test = {k: v for k, v in _test_groups(root, set(train)).items() if v}
        if not test:
            raise _Malformed("the test split has no images")
        train_paths, y_train = _flatten(train, index)
        test_paths, y_test = _flatten(test, index)
        size = min(_image_size(train_paths[0]))
        x_train, x_test = _stack(train_paths, size), _stack(test_paths, size)
    except _Malformed as exc:
        raise _error("imagefolder", root, str(exc), _FOLDER_LAYOUT) from None
    return RawData(x_train, y_train, x_test, y_test)
