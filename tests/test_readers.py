"""Dataset readers: tiny files in each real on-disk format, read back; malformed files refused."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from _formats import write_cifar
from PIL import Image

from zoo import readers
from zoo.data import DataError, load_splits

# ---------------------------------------------------------------------------------------------
# MNIST (IDX)
# ---------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.tile(np.arange(10, dtype=np.uint8), 2),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(10, dtype=np.uint8)[::-1].copy(),
    }


def _write_mnist(folder: Path, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _mnist_arrays(seed)
    for name, arr in arrays.items():
        data = _idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("torchvision_layout", [True, False])
def test_mnist_reads_both_layouts_plain_and_gzipped(
    tmp_path: Path, gz: bool, torchvision_layout: bool
) -> None:
    folder = tmp_path / "MNIST" / "raw" if torchvision_layout else tmp_path
    arrays = _write_mnist(folder, gz=gz)
    raw = readers.read_mnist(tmp_path, False)
    assert raw.x_train.shape == (20, 1, 28, 28) and raw.x_train.dtype == np.uint8
    assert raw.y_train.dtype == np.int64 and raw.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(raw.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_train, np.tile(np.arange(10), 2))
    np.testing.assert_array_equal(raw.x_test[:, 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(raw.y_test, np.arange(10)[::-1])


def test_mnist_through_load_splits(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    s = load_splits("mnist", data_root=tmp_path, clean_ratio=0.5)
    assert s.info.size == 28 and s.info.channels == 1
    assert tuple(s.train.x.shape) == (20, 1, 28, 28) and len(s.clean) == 10
    assert sorted(s.clean.y.tolist()) == list(range(10))  # balanced: one image per class
    assert np.array_equal(s.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert len(s.val) + len(s.test) == 10


def test_mnist_missing_root_names_root_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        readers.read_mnist(tmp_path / "nowhere", False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg
    assert "ROOT/MNIST/raw/" in msg and "t10k-labels-idx1-ubyte" in msg
    with pytest.raises(DataError, match="needs --data-root"):
        readers.read_mnist(None, False)
    with pytest.raises(DataError, match="IDX files not found"):
        readers.read_mnist(tmp_path, False)


def test_mnist_truncated_gzip_is_refused(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a complete gzip"):
        readers.read_mnist(tmp_path, False)


def test_mnist_truncated_idx_is_refused(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        DataError,
        match=r"t10k-images-idx3-ubyte: IDX of shape \(10, 28, 28\) has 7855 bytes, expected 7856",
    ):
        readers.read_mnist(tmp_path, False)


def test_mnist_wrong_magic_is_refused(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(20, np.uint8), 2051))
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        readers.read_mnist(tmp_path, False)


def test_mnist_count_mismatch_is_refused(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(19, np.uint8), 2049))
    with pytest.raises(DataError, match="20 images but train-labels-idx1-ubyte 19 labels"):
        readers.read_mnist(tmp_path, False)


def test_download_fetches_with_torchvision_only_when_files_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    calls = []

    class FakeMNIST:  # torchvision's downloader, offline: writes the files it would fetch
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            _write_mnist(Path(root) / "MNIST" / "raw", gz=True)

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    with pytest.raises(DataError, match="--download needs --data-root"):
        readers.read_mnist(None, True)
    assert readers.read_mnist(tmp_path / "m", True).x_train.shape == (20, 1, 28, 28)
    assert calls and all(c[0] == str(tmp_path / "m") and c[2] for c in calls)
    calls.clear()  # files in place: --download has nothing to fetch
    assert readers.read_mnist(tmp_path / "m", True).x_test.shape[1:] == (1, 28, 28)
    assert calls == []


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_reads_batches_in_order(tmp_path: Path, protocol: int) -> None:
    batches = write_cifar(tmp_path, protocol=protocol)
    raw = readers.read_cifar10(tmp_path, False)
    assert raw.x_train.shape == (100, 3, 32, 32) and raw.x_train.dtype == np.uint8
    assert raw.y_train.dtype == np.int64 and raw.x_test.shape == (20, 3, 32, 32)
    first = batches["data_batch_1"]
    data = first[b"data"]
    assert isinstance(data, np.ndarray)
    # Row layout: 1024 red values (row-major 32x32), then green, then blue.
    np.testing.assert_array_equal(raw.x_train[0, 0], data[0, :1024].reshape(32, 32))
    np.testing.assert_array_equal(raw.x_train[0, 2, 31, 31], data[0, 3071])
    np.testing.assert_array_equal(raw.y_train[:20], first[b"labels"])
    np.testing.assert_array_equal(raw.y_train[80:], batches["data_batch_5"][b"labels"])
    np.testing.assert_array_equal(raw.y_test, batches["test_batch"][b"labels"])


def test_cifar10_through_load_splits(tmp_path: Path) -> None:
    write_cifar(tmp_path, n=40)
    s = load_splits("cifar10", data_root=tmp_path, clean_ratio=0.5)
    assert s.info.num_classes == 10 and tuple(s.train.x.shape) == (200, 3, 32, 32)
    assert len(s.val) + len(s.test) == 40 and s.train.y.dtype.is_floating_point is False


def test_cifar10_missing_batch_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing data_batch_4 .*cifar-10-batches-py/ holding"):
        readers.read_cifar10(tmp_path, False)
    with pytest.raises(DataError, match="data root is not a directory"):
        readers.read_cifar10(tmp_path / "absent", False)


def _replace_batch(root: Path, name: str, obj: object) -> None:
    with (root / "cifar-10-batches-py" / name).open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_wrong_shape_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    bad = {b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20}
    _replace_batch(tmp_path, "data_batch_2", bad)
    with pytest.raises(
        DataError, match=r"data_batch_2 b'data' is \(20, 3000\), expected N x 3072 uint8"
    ):
        readers.read_cifar10(tmp_path, False)


def test_cifar10_missing_keys_and_bad_labels_are_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    _replace_batch(tmp_path, "test_batch", {b"data": np.zeros((20, 3072), np.uint8)})
    with pytest.raises(DataError, match="test_batch lacks the keys"):
        readers.read_cifar10(tmp_path, False)
    _replace_batch(
        tmp_path, "test_batch", {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 19}
    )
    with pytest.raises(DataError, match="test_batch b'labels' is not 20 integers"):
        readers.read_cifar10(tmp_path, False)


def test_cifar10_truncated_pickle_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR pickle"):
        readers.read_cifar10(tmp_path, False)


class _Evil:
    """Unpickling this with a plain pickle.load would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch '{self.marker}'",))


def test_cifar10_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "MARKER"
    evil = {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 20, b"x": _Evil(marker)}
    _replace_batch(tmp_path, "data_batch_3", evil)
    with pytest.raises(
        DataError, match=r"data_batch_3 is not a CIFAR pickle \(refused global (posix|nt)\.system\)"
    ):
        readers.read_cifar10(tmp_path, False)
    assert not marker.exists()


def test_cifar10_codecs_other_than_latin1_are_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    import codecs

    class Zipped:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (codecs.encode, ("x", "zlib_codec"))

    _replace_batch(tmp_path, "data_batch_1", {b"data": Zipped(), b"labels": []})
    with pytest.raises(DataError, match="refused _codecs.encode with encoding 'zlib_codec'"):
        readers.read_cifar10(tmp_path, False)


# ---------------------------------------------------------------------------------------------
# GTSRB (ppm + CSV)
# ---------------------------------------------------------------------------------------------

_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def _color(label: int, i: int) -> tuple[int, int, int]:
    return (10 * label + 5, 7 * i + 3, 200 - label)


def _ppm(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    Image.new("RGB", size, color).save(path)  # .ppm suffix -> binary P6, as GTSRB ships


def _write_gtsrb(root: Path, test_csv_at: str = "root") -> Path:
    """3 classes x 4 train images, 5 test images, uniform colours, odd sizes (resize is exact)."""
    base = root / "GTSRB"
    for label in range(3):
        folder = base / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i in range(4):
            name = f"00000_{i:05d}.ppm"
            _ppm(folder / name, (30 + i, 35 - i), _color(label, i))
            rows.append(f"{name};{30 + i};{35 - i};5;5;25;25;{label}\n")
        (folder / f"GT-{label:05d}.csv").write_text(_HEADER + "".join(rows))
    images = base / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = []
    for i, label in enumerate([2, 0, 1, 2, 0]):
        _ppm(images / f"{i:05d}.ppm", (40, 33), _color(label, i))
        rows.append(f"{i:05d}.ppm;40;33;5;5;35;28;{label}\n")
    where = {"root": root, "images": images, "base": base}[test_csv_at]
    (where / "GT-final_test.csv").write_text(_HEADER + "".join(rows))
    return base


@pytest.mark.parametrize("test_csv_at", ["root", "images", "base"])
def test_gtsrb_reads_official_layout(tmp_path: Path, test_csv_at: str) -> None:
    _write_gtsrb(tmp_path, test_csv_at)
    raw = readers.read_gtsrb(tmp_path, False)
    assert raw.x_train.shape == (12, 3, 32, 32) and raw.x_train.dtype == np.uint8
    np.testing.assert_array_equal(raw.y_train, np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(raw.y_test, [2, 0, 1, 2, 0])
    assert raw.y_train.dtype == np.int64 and raw.x_test.shape == (5, 3, 32, 32)
    for n, (label, i) in enumerate([(lab, i) for lab in range(3) for i in range(4)]):
        assert (raw.x_train[n].reshape(3, -1).T == _color(label, i)).all()
    assert (raw.x_test[2].reshape(3, -1).T == _color(1, 2)).all()


def test_gtsrb_root_may_be_the_gtsrb_folder(tmp_path: Path) -> None:
    base = _write_gtsrb(tmp_path, "base")
    assert readers.read_gtsrb(base, False).x_train.shape == (12, 3, 32, 32)


def test_gtsrb_through_load_splits(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    s = load_splits("gtsrb", data_root=tmp_path, clean_ratio=0.5)
    assert s.info.num_classes == 43 and s.info.size == 32
    assert len(s.clean) == 6 and sorted(s.clean.y.tolist()) == [0, 0, 1, 1, 2, 2]


def test_gtsrb_missing_class_csv_is_named(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Training" / "Images" / "00001" / "GT-00001.csv").unlink()
    with pytest.raises(DataError, match=r"gtsrb: missing .*GT-00001\.csv .*expected ROOT/GTSRB/"):
        readers.read_gtsrb(tmp_path, False)


def test_gtsrb_missing_test_csv_is_named(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GT-final_test.csv not found"):
        readers.read_gtsrb(tmp_path, False)
    with pytest.raises(DataError, match="training folder not found"):
        readers.read_gtsrb(tmp_path / "GTSRB" / "Final_Test", False)


def test_gtsrb_bad_csv_is_refused(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    csv_path = tmp_path / "GT-final_test.csv"
    csv_path.write_text(_HEADER + "00000.ppm;40;33;5;5;35;28;forty\n")
    with pytest.raises(DataError, match="line 2: bad row .*ClassId 'forty'"):
        readers.read_gtsrb(tmp_path, False)
    csv_path.write_text("Filename,Width,ClassId\n00000.ppm,40,2\n")
    with pytest.raises(DataError, match="expected Filename;...;ClassId"):
        readers.read_gtsrb(tmp_path, False)
    csv_path.write_text(_HEADER + "nothere.ppm;40;33;5;5;35;28;1\n")
    with pytest.raises(DataError, match="lists nothere.ppm"):
        readers.read_gtsrb(tmp_path, False)


def test_gtsrb_unreadable_image_is_named(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "Final_Test" / "Images" / "00003.ppm").write_bytes(
        b"P6\n40 33\n255\n" + b"\0" * 10
    )
    with pytest.raises(DataError, match="cannot read image .*00003.ppm"):
        readers.read_gtsrb(tmp_path, False)


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


def _png(
    path: Path, size: tuple[int, int], color: tuple[int, int, int] | int, mode: str = "RGB"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def _write_folder(root: Path, test_name: str = "test") -> None:
    _png(root / "train" / "cat" / "a.png", (10, 8), (255, 0, 0))  # first image: 10 wide, 8 high
    _png(root / "train" / "cat" / "b.jpg", (8, 8), (0, 0, 0))
    _png(root / "train" / "dog" / "x.PNG", (16, 16), (0, 128, 255))
    _png(root / "train" / "dog" / "y.bmp", (8, 8), 77, mode="L")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    _png(root / test_name / "dog" / "t.png", (8, 8), (1, 2, 3))


def test_imagefolder_reads_classes_sizes_and_colours(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    raw = readers.read_imagefolder(tmp_path, False)
    assert raw.x_train.shape == (4, 3, 8, 8) and raw.x_train.dtype == np.uint8
    np.testing.assert_array_equal(raw.y_train, [0, 0, 1, 1])  # cat=0, dog=1 (sorted names)
    np.testing.assert_array_equal(raw.y_test, [1])
    assert raw.y_train.dtype == np.int64
    assert (raw.x_train[0].reshape(3, -1).T == (255, 0, 0)).all()
    assert (raw.x_train[2].reshape(3, -1).T == (0, 128, 255)).all()  # resized 16 -> 8
    assert (raw.x_train[3] == 77).all()  # greyscale -> RGB
    assert (raw.x_test[0].reshape(3, -1).T == (1, 2, 3)).all()


def test_imagefolder_val_and_load_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path, test_name="val")
    _png(tmp_path / "val" / "cat" / "v.png", (8, 8), (9, 9, 9))
    s = load_splits("imagefolder", data_root=tmp_path, clean_ratio=0.5)
    assert s.info.num_classes == 2 and s.info.size == 8 and s.info.channels == 3
    assert len(s.train) == 4 and len(s.clean) == 2 and len(s.val) + len(s.test) == 2


def test_imagefolder_tiny_imagenet_as_shipped(tmp_path: Path) -> None:
    for wnid, color in (("n01", (10, 20, 30)), ("n02", (40, 50, 60))):
        for i in range(2):
            _png(tmp_path / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (8, 8), color)
    _png(tmp_path / "test" / "images" / "test_0.JPEG", (8, 8), (0, 0, 0))  # unlabelled
    for i in range(3):
        _png(tmp_path / "val" / "images" / f"val_{i}.JPEG", (8, 8), (i, i, i))
    (tmp_path / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t8\t8\nval_1.JPEG\tn01\t0\t0\t8\t8\nval_2.JPEG\tn02\t1\t1\t7\t7\n"
    )
    raw = readers.read_imagefolder(tmp_path, False)
    np.testing.assert_array_equal(raw.y_train, [0, 0, 1, 1])
    np.testing.assert_array_equal(raw.y_test, [0, 1, 1])  # grouped by class: val_1, val_0, val_2
    assert (raw.x_test[:, 0, 0, 0] == [1, 0, 2]).all()


def test_imagefolder_unknown_test_class_is_refused(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    _png(tmp_path / "test" / "bird" / "z.png", (8, 8), (0, 0, 0))
    with pytest.raises(DataError, match="no usable test/ or val/ folder .*ROOT/train/<class>"):
        readers.read_imagefolder(tmp_path, False)


def test_imagefolder_missing_train_and_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/ folder not found"):
        readers.read_imagefolder(tmp_path, False)
    with pytest.raises(DataError, match="--download is not available"):
        readers.read_imagefolder(tmp_path, True)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        readers.read_imagefolder(tmp_path, False)


def test_cifar10_accepts_numpy1_global_names_as_in_the_official_files(tmp_path: Path) -> None:
    # The official batches (pickled by numpy 1.x) name numpy.core.multiarray._reconstruct.
    batches = write_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    data = path.read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in data
    path.write_bytes(
        data.replace(
            b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
        )
    )
    raw = readers.read_cifar10(tmp_path, False)
    np.testing.assert_array_equal(
        raw.x_train[:20].reshape(20, -1), batches["data_batch_1"][b"data"]
    )
