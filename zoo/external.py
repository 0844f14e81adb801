"""Victims trained elsewhere: their files read safely, their weights fitted to a registered arch,
and their store entries.

Reading (every reader refuses with one line, :class:`ExternalError`, naming the file):

- weights: ``.safetensors`` (parsed by safetensors, never unpickled) or ``.pt``/``.pth`` read
  with ``torch.load(weights_only=True)`` and no extra allowed globals: a state_dict, or a
  checkpoint dict holding one under ``state_dict`` or ``model``; DataParallel's ``module.``
  prefix is dropped;
- triggered sets: an ``.npz`` (``np.load(allow_pickle=False)``) with ``x`` (uint8 images,
  N x C x H x W, N x H x W x C or N x H x W) and ``y`` (true labels), or a folder of images
  ``DIR/<label>/*.png`` (BackdoorBench's ``bd_test_dataset`` layout; ``<label>`` the true
  class index, or a class name where the caller knows the class names);
- image folders of clean data, ``DIR/<class>/**/*.{png,jpg,jpeg,ppm,bmp}``.

Files are regular files below a size cap (``MAX_FILE_BYTES``; an npz's members are measured
before they are inflated).

Fitting (:func:`fit_state_dict`): the weights must have exactly the arch's tensors. Where the
names differ but the tensors match one to one in order and shape (a BackdoorBench
PreAct-ResNet18 names its head ``linear``), they are renamed by position, as BackdoorBench's own
``load_attack_result`` does; anything else is refused naming the first missing and unexpected
names, and a head of the wrong size is reported as a class-count mismatch.

Store layout of an external victim (see :mod:`zoo.victims`): key
``Store.key({"kind": "external", ...description})``, the description holding the sha256 of
the weights and of the triggered images with everything that determines the victim (arch,
dataset, classes, normalization, target); groups ``model`` and one of ``triggered`` (``x``,
``y``: one set, cut into val/test halves with the split seed when loaded), ``triggered_val``
and ``triggered_test`` (given halves) or ``attack`` (a built-in trigger's state); ``meta``
holds the description plus where it came from. A named victim (``bb:NAME``) also has a pointer
entry, key ``Store.key({"kind": "victim-name", "name": label})``, with no tensors, whose meta
names the victim's key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from zoo.data import DataError, DatasetInfo, Split
from zoo.models import build_model
from zoo.store import Entry, Store

__all__ = [
    "IMAGE_EXTS",
    "MAX_FILE_BYTES",
    "ExternalError",
    "check_name",
    "check_regular",
    "class_folders",
    "fit_state_dict",
    "halves",
    "load_weights",
    "name_key",
    "named_entry",
    "put_external",
    "read_folder",
    "read_image",
    "read_regular",
    "read_triggered",
    "sha256",
    "split_sha256",
    "state_sha256",
    "strip_module_prefix",
    "unpickling_reason",
    "with_normalization",
]

MAX_FILE_BYTES = 4 << 30  # a vit_b_16 checkpoint is 0.35 GB; a triggered npz far less
MAX_IMAGES = 2_000_000  # images in one folder tree
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ExternalError(DataError):
    """A file of a victim trained elsewhere that cannot be used (one line, naming the file)."""


def _short(text: Any, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check_name(name: Any, what: str) -> str:
    """A victim name: 1-64 letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExternalError(f"{what} {_short(repr(name), 70)}: expected 1 to 64 letters, digits, "
                            "'_', '.' or '-', starting with a letter or digit")
    return name


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def check_regular(path: Path, *, what: str, max_bytes: int = MAX_FILE_BYTES) -> None:
    """ExternalError unless ``path`` is a regular file of at most ``max_bytes``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ExternalError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ExternalError(f"{what} {path}: not a regular file")
    if st.st_size > max_bytes:
        raise ExternalError(f"{what} {path}: {st.st_size} bytes: expected at most {max_bytes}")


def read_regular(path: Path, *, what: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``; else ExternalError."""
    check_regular(path, what=what, max_bytes=max_bytes)
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except OSError as exc:
        raise ExternalError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors as safetensors bytes (names sorted): the same for the same weights
    whichever file format they came in."""
    plain = {k: state[k].detach().cpu().contiguous().clone() for k in sorted(state)}
    return sha256(save_safetensors(plain))


def split_sha256(*splits: Split) -> str:
    """sha256 of the images and labels of ``splits``, in order."""
    h = hashlib.sha256()
    for s in splits:
        h.update(np.ascontiguousarray(s.x.cpu().numpy()).tobytes())
        h.update(np.ascontiguousarray(s.y.cpu().numpy().astype("<i8")).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _tensor_map(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def load_weights(path: Path, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or ``.pt``/``.pth`` (``weights_only=True``)."""
    path = Path(path)
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ExternalError(f"{what} {path}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    data = read_regular(path, what=what)
    if path.suffix.lower() == ".safetensors":
        try:
            state: dict[str, torch.Tensor] | None = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ExternalError(f"{what} {path}: not a safetensors file ({_short(exc)})") from None
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, TypeError,
                AttributeError, ImportError, IndexError, KeyError) as exc:
            raise ExternalError(f"{what} {path}: not a plain state_dict file "
                                f"({unpickling_reason(exc)})") from None
        state = _tensor_map(obj)
        if state is None and isinstance(obj, Mapping):
            state = _tensor_map(obj.get("state_dict")) or _tensor_map(obj.get("model"))
    if not state:
        raise ExternalError(f"{what} {path}: expected a mapping of tensor names to tensors (a "
                            "state_dict, or a checkpoint with one under 'state_dict' or 'model')")
    return strip_module_prefix(state)


def unpickling_reason(exc: BaseException) -> str:
    """The line of a ``torch.load(weights_only=True)`` error that says what was refused."""
    text = str(exc)
    for line in text.splitlines():
        if "Unsupported global" in line or "unsupported GLOBAL" in line:
            return _short(line.strip(), 200)
    return _short(text.splitlines()[0] if text else type(exc).__name__, 200)


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel's ``module.`` prefix dropped, as BackdoorBench's ``load_attack_result``."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _head_names(model: torch.nn.Module) -> set[str]:
    head = getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        return set()
    ids = {id(t) for t in head.state_dict(keep_vars=True).values()}
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def fit_state_dict(state: Mapping[str, torch.Tensor], arch: str, info: DatasetInfo, *,
                   where: str) -> tuple[dict[str, torch.Tensor], bool]:
    """``(state in the arch's own names, renamed by position?)``; ExternalError (naming
    ``where``) when the weights are not ``arch`` for ``info``'s channels and classes."""
    try:
        model = build_model(arch, info)
    except ValueError as exc:
        raise ExternalError(f"{where}: {exc}") from None
    ref = model.state_dict()
    heads = _head_names(model)
    names = list(state)
    renamed = False
    if set(names) != set(ref):
        shapes_match = len(names) == len(ref) and all(
            tuple(state[a].shape) == tuple(ref[b].shape) for a, b in zip(names, ref, strict=True))
        if not shapes_match:
            _refuse_names(state, ref, heads, arch, info, where)
        state = {b: state[a] for a, b in zip(names, ref, strict=True)}
        renamed = True
    for k, t in ref.items():
        got = tuple(state[k].shape)
        if got != tuple(t.shape):
            if k in heads and got[:1] != tuple(t.shape)[:1]:
                raise ExternalError(
                    f"{where}: the weights' head ({k}) has {got[0]} classes: expected "
                    f"{info.num_classes} (the data's)")
            raise ExternalError(f"{where}: tensor {k} has shape {list(got)}: expected "
                                f"{list(t.shape)} for arch {arch!r} on {info.channels}-channel "
                                f"{info.size}x{info.size} images")
        both_float = state[k].is_floating_point() and t.is_floating_point()
        if state[k].dtype != t.dtype and not both_float:
            raise ExternalError(f"{where}: tensor {k} is {state[k].dtype}: expected {t.dtype}")
    fitted = {k: state[k].detach().to(ref[k].dtype).contiguous() for k in ref}
    model.load_state_dict(fitted)  # strict: the checks above make this succeed
    return fitted, renamed


def _refuse_names(state: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                  heads: set[str], arch: str, info: DatasetInfo, where: str) -> None:
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    # Same names except the head's shape: a class-count mismatch says more than a name list.
    for k in heads:
        if k in state and state[k].shape[:1] != ref[k].shape[:1]:
            raise ExternalError(f"{where}: the weights' head ({k}) has {state[k].shape[0]} "
                                f"classes: expected {info.num_classes} (the data's)")

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = [f"missing {few(missing)}" if missing else "",
             f"unexpected {few(unexpected)}" if unexpected else ""]
    raise ExternalError(f"{where}: not a {arch!r} state_dict ({len(state)} tensors, the arch has "
                        f"{len(ref)}; {'; '.join(p for p in parts if p)}): expected the weights "
                        "of that arch (see --arch)")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def read_image(path: Path, channels: int, size: int | None, *, resize: bool) -> np.ndarray:
    """C x H x W uint8; resized bilinearly to size x size when ``resize``, else checked."""
    try:
        with Image.open(path) as opened:
            img = opened.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size, size):
                if not resize:
                    raise ExternalError(f"image {path} is {img.size[0]}x{img.size[1]}: expected "
                                        f"{size}x{size}")
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ExternalError(f"image {path}: cannot read ({_short(exc)})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def class_folders(root: Path, *, what: str) -> dict[str, list[Path]]:
    """``{folder name: image files below it, sorted}`` for the subfolders of ``root``."""
    if not root.is_dir():
        raise ExternalError(f"{what} {root}: not a folder")
    out: dict[str, list[Path]] = {}
    count = 0
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        count += len(files)
        if count > MAX_IMAGES:
            raise ExternalError(f"{what} {root}: more than {MAX_IMAGES} images")
        if files:
            out[d.name] = files
    if not out:
        raise ExternalError(f"{what} {root}: no images in class folders: expected "
                            f"{root}/<class>/*{{{','.join(IMAGE_EXTS)}}}")
    return out


def folder_labels(names: list[str], classes: list[str] | None, *, what: str, root: Path
                  ) -> dict[str, int]:
    """Folder name -> class index: the number itself when every name is a whole number, else
    the position in ``classes`` (sorted names when None, as torchvision's ImageFolder)."""
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    order = sorted(names) if classes is None else list(classes)
    unknown = [n for n in names if n not in order]
    if unknown:
        raise ExternalError(f"{what} {root}: folder {unknown[0]!r} is not a class of the clean "
                            "data: expected class-index folders (0, 1, ...) or its class names")
    return {n: order.index(n) for n in names}


def read_folder(root: Path, *, channels: int, size: int | None, what: str,
                classes: list[str] | None = None, resize: bool = False
                ) -> tuple[Split, list[str]]:
    """Images of ``root/<class>/...`` as a Split, and the folder names in label order."""
    groups = class_folders(root, what=what)
    labels = folder_labels(list(groups), classes, what=what, root=root)
    if size is None:
        first = next(iter(groups.values()))[0]
        try:
            with Image.open(first) as img:
                size = min(img.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise ExternalError(f"image {first}: cannot read ({_short(exc)})") from None
        resize = True
    xs, ys = [], []
    for name, files in groups.items():
        for f in files:
            xs.append(read_image(f, channels, size, resize=resize))
            ys.append(labels[name])
    x = torch.from_numpy(np.stack(xs))
    return Split(x, torch.tensor(ys, dtype=torch.long)), sorted(groups, key=lambda n: labels[n])


def _npz(path: Path, *, what: str) -> Split:
    check_regular(path, what=what)
    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(i.file_size for i in zf.infolist())
        if inflated > MAX_FILE_BYTES:
            raise ExternalError(f"{what} {path}: inflates to {inflated} bytes: expected at most "
                                f"{MAX_FILE_BYTES}")
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise ExternalError(f"{what} {path}: holds {sorted(npz.files)}: expected arrays "
                                    "'x' (uint8 images) and 'y' (true labels)")
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ExternalError(f"{what} {path}: not an .npz file ({_short(exc)})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ExternalError(f"{what} {path}: x is {x.dtype} of shape {list(x.shape)}: expected "
                            "uint8 images N x C x H x W (or N x H x W x C, or N x H x W)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise ExternalError(f"{what} {path}: y is {y.dtype} of shape {list(y.shape)}: expected "
                            f"{len(x)} integer labels")
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))


def read_triggered(path: Path, *, channels: int, size: int, num_classes: int, what: str,
                   target: int | None = None, classes: list[str] | None = None) -> Split:
    """A triggered set with TRUE labels (an ``.npz`` or a folder), checked against the
    images' shape and the class count; images of the target class are dropped (ASR counts
    non-target images only)."""
    path = Path(path)
    if path.is_dir():
        split, _ = read_folder(path, channels=channels, size=size, what=what, classes=classes)
    elif path.suffix.lower() == ".npz":
        split = _npz(path, what=what)
    else:
        raise ExternalError(f"{what} {path}: expected an .npz file or a folder of "
                            "<label>/ image folders")
    shape = tuple(split.x.shape[1:])
    if shape != (channels, size, size):
        raise ExternalError(f"{what} {path}: images are {'x'.join(map(str, shape))} (C x H x W): "
                            f"expected {channels}x{size}x{size}")
    if len(split) and not (0 <= int(split.y.min()) and int(split.y.max()) < num_classes):
        raise ExternalError(f"{what} {path}: a label outside 0..{num_classes - 1}")
    if target is not None:
        split = split.subset(torch.nonzero(split.y != target).flatten())
    if len(split) == 0:
        raise ExternalError(f"{what} {path}: no triggered images of a non-target class")
    return split


def halves(split: Split, seed: int) -> tuple[Split, Split]:
    """Disjoint val and test halves, stratified by true class, from ``seed`` (a class's odd
    image goes to test)."""
    rng = np.random.default_rng(seed)
    y = split.y.numpy()
    val, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        val.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2:])
    pick = [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in (val, test)]
    return split.subset(pick[0]), split.subset(pick[1])


def with_normalization(info: DatasetInfo, mean: Any, std: Any, *, where: str) -> DatasetInfo:
    """``info`` with the model's own input normalization (per channel, in [0, 1] units)."""
    if mean is None and std is None:
        return info
    try:
        m = tuple(float(v) for v in mean)
        s = tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ExternalError(f"{where}: mean {mean!r}, std {std!r}: expected lists of "
                            "numbers") from None
    if len(m) != info.channels or len(s) != info.channels:
        raise ExternalError(f"{where}: mean {list(m)}, std {list(s)}: expected "
                            f"{info.channels} value(s) each, one per channel")
    if not all(np.isfinite(m)) or not all(np.isfinite(v) and v > 0 for v in s):
        raise ExternalError(f"{where}: mean {list(m)}, std {list(s)}: expected finite "
                            "numbers and std > 0")
    return dataclasses.replace(info, mean=m, std=s)


# ---------------------------------------------------------------------------------------------
# Store entries
# ---------------------------------------------------------------------------------------------


def name_key(label: str) -> str:
    """Store key of the pointer entry of a named victim (``bb:NAME``)."""
    return Store.key({"kind": "victim-name", "name": label})


def put_external(store: Store, description: dict[str, Any],
                 groups: dict[str, dict[str, torch.Tensor]],
                 meta: dict[str, Any], *, label: str | None = None) -> Entry:
    """Store an external victim under the hash of ``description`` (kept if already there);
    with ``label``, point the name at it (replacing an older victim of that name)."""
    key = Store.key({"kind": "external", **description})
    with store.lock(key):
        entry = store.get(key)
        if entry is None:
            entry = store.put(key, groups, {"kind": "external", **description, **meta})
    if label is not None:
        store.put(name_key(label), {}, {"kind": "victim-name", "name": label, "victim": key,
                                        **{k: description[k] for k in
                                           ("dataset", "arch", "channels", "size",
                                            "num_classes") if k in description}})
    return entry


def named_entry(store: Store, label: str) -> dict[str, Any] | None:
    """The pointer's meta of named victim ``label`` (no tensors read), or None."""
    pointer = store.get(name_key(label))
    return None if pointer is None else pointer.meta
