"""The victim store: tensors on disk, keyed by a hash of everything that determines them.

Layout of one entry (``ROOT`` defaults to ``$XDG_CACHE_HOME/backdoor-ft-tuner/zoo``)::

    ROOT/<key>/<group>.safetensors   one file per group of tensors (e.g. "model", "attack")
    ROOT/<key>/meta.json             {"format_version", "key", "meta", "checksums", "digest"}
    ROOT/<key>.lock                  the inter-process lock for building <key>

``checksums`` maps each group file to the sha256 of its bytes; ``digest`` is the sha256 of the
canonical JSON of the rest of ``meta.json``, so an edited ``meta.json`` is caught too.

Safety rules:

- writes are atomic: an entry is written into a temporary folder inside ROOT, fsynced, then
  renamed into place, so a reader sees a whole entry or none;
- loads never unpickle: group files are parsed by safetensors from the bytes whose checksum was
  just verified;
- a corrupt entry (bad checksum, truncated file, unparsable, huge or deeply nested JSON, ...)
  is reported with one line on stderr, removed, and reported missing, so the caller rebuilds it;
- a lock file that is a symbolic link is removed, never followed.

What the checksums promise: they catch accidents (a flipped bit, a truncated copy, an
interrupted write, a hand-edited ``meta.json``), not an adversary who can write the store: the
digests are plain SHA-256 that anyone can recompute. ``zoo.victims`` therefore also checks that
a victim's metadata re-derives its key and that its tensors fit the architecture; trust in a
store beyond that is trust in who can write it (keep it private, as ``~/.cache`` is).

Callers that build entries hold :meth:`Store.lock` around "get, else build and put", so
concurrent processes build each entry once::

    with store.lock(k):
        entry = store.get(k)
        if entry is None:
            entry = store.put(k, build(), meta)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

__all__ = ["FORMAT_VERSION", "LOCK_TIMEOUT_S", "Entry", "Store", "StoreError", "key"]

FORMAT_VERSION = 4  # bump when the entry layout, what a key describes or a model changes
# 2: cnn pools after its first convolution on images larger than 16 x 16.
# 3: preact-resnet18's head is stored as linear.* (BackdoorBench's key name), not head.*.
# 4: Input-aware victims train in fp32 on a CPU (were bf16 autocast on CPUs with AMX).
LOCK_TIMEOUT_S = 3600.0  # a victim build on a slow machine fits in an hour
MAX_META_BYTES = 16 << 20  # a victim's meta.json is a few kB; an external one's well under this

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_META = "meta.json"
_SUFFIX = ".safetensors"


class StoreError(ValueError):
    """A bad argument to the store: an unsafe key or group name, unserializable meta."""


class _Corrupt(Exception):
    """An entry on disk that fails verification (internal; never escapes :meth:`Store.get`)."""


@dataclass(frozen=True)
class Entry:
    """One stored entry: its key, the user's meta, and its groups of CPU tensors."""

    key: str
    meta: dict[str, Any]
    groups: dict[str, dict[str, torch.Tensor]] = field(repr=False)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key(description: dict[str, Any]) -> str:
    """The store key of ``description``: sha256 (24 hex digits) of its canonical JSON.

    The store's :data:`FORMAT_VERSION` is part of what is hashed, so a new format never reads
    an old entry.

    >>> key({"dataset": "digits", "seed": 0}) == key({"seed": 0, "dataset": "digits"})
    True
    """
    if not isinstance(description, dict):
        raise StoreError(f"store key description must be a dict, got {type(description).__name__}")
    try:
        text = _canonical({"description": description, "format_version": FORMAT_VERSION})
    except (TypeError, ValueError) as exc:
        raise StoreError(
            f"store key description is not plain JSON ({exc}): {description!r}"
        ) from None
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(
            f"store {kind} {name!r} is not a safe name: expected letters, digits, "
            "'_', '.', '-' (not leading '.' or '-'), at most 128 characters"
        )
    return name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _meta_document(
    entry_key: str, meta: dict[str, Any], checksums: dict[str, str]
) -> dict[str, Any]:
    """The content of ``meta.json``, sealed with a digest of the rest of the document."""
    doc = {"format_version": FORMAT_VERSION, "key": entry_key, "meta": meta, "checksums": checksums}
    return {**doc, "digest": _sha256(_canonical(doc).encode())}


def _tensor_bytes(group: str, tensors: dict[str, torch.Tensor]) -> bytes:
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise StoreError(f"store group {group!r} must map str names to tensors")
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return save_safetensors(plain)


class Store:
    """Entries under ``root``, one folder per key. See the module docstring for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @staticmethod
    def default_root() -> Path:
        """``$XDG_CACHE_HOME/backdoor-ft-tuner/zoo``; ``~/.cache/...`` when that is unset."""
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "backdoor-ft-tuner" / "zoo"

    key = staticmethod(key)

    def path(self, entry_key: str) -> Path:
        """The folder of entry ``entry_key``."""
        return self.root / _check_name("key", entry_key)

    def entries(self) -> list[str]:
        """Keys of the entries present (not verified), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def lock(self, entry_key: str, timeout: float = LOCK_TIMEOUT_S) -> filelock.FileLock:
        """An inter-process lock on ``ROOT/<key>.lock``; use as ``with store.lock(k): ...``."""
        _check_name("key", entry_key)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{entry_key}.lock"
        if path.is_symlink():  # never ours: filelock would refuse it with a traceback
            print(f"zoo store: {path} is a symbolic link; replaced by a lock file",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
        return filelock.FileLock(str(path), timeout=timeout)

    # -- reading ------------------------------------------------------------------------------

    def get(self, entry_key: str) -> Entry | None:
        """The verified entry, or None when it is missing or was corrupt (then it is removed)."""
        folder = self.path(entry_key)
        if not folder.exists():
            return None
        try:
            return self._load(folder, entry_key)
        except _Corrupt as exc:
            reason = " ".join(str(exc).split())
            print(
                f"zoo store: entry {entry_key} is corrupt ({reason}); rebuilding", file=sys.stderr
            )
            self.remove(entry_key)
            return None

    def _load(self, folder: Path, entry_key: str) -> Entry:
        doc = self._read_meta(folder, entry_key)
        groups = {}
        for name, expected in doc["checksums"].items():
            groups[name[: -len(_SUFFIX)]] = self._read_group(folder / name, expected)
        return Entry(entry_key, doc["meta"], groups)

    @staticmethod
    def _read_meta(folder: Path, entry_key: str) -> dict[str, Any]:
        try:
            with (folder / _META).open("rb") as fh:
                data = fh.read(MAX_META_BYTES + 1)
            if len(data) > MAX_META_BYTES:
                raise _Corrupt(f"{_META} is larger than {MAX_META_BYTES} bytes")
            doc = json.loads(data)
        except FileNotFoundError:
            raise _Corrupt(f"{_META} is missing") from None
        except (OSError, ValueError, RecursionError) as exc:  # JSON and Unicode errors, nesting
            raise _Corrupt(f"{_META} does not parse: {str(exc)[:120]}") from None
        if not isinstance(doc, dict) or set(doc) != {
            "format_version",
            "key",
            "meta",
            "checksums",
            "digest",
        }:
            raise _Corrupt(f"{_META} does not have the expected fields")
        body = {k: v for k, v in doc.items() if k != "digest"}
        if doc["digest"] != _sha256(_canonical(body).encode()):
            raise _Corrupt(f"{_META} digest mismatch (edited)")
        if doc["format_version"] != FORMAT_VERSION or doc["key"] != entry_key:
            raise _Corrupt(f"{_META} is for key {doc['key']!r}, format {doc['format_version']!r}")
        checksums = doc["checksums"]
        if not isinstance(checksums, dict) or not all(
            isinstance(n, str) and n.endswith(_SUFFIX) and _NAME.fullmatch(n) for n in checksums
        ):
            raise _Corrupt(f"{_META} lists unexpected files")
        return doc

    @staticmethod
    def _read_group(path: Path, expected: str) -> dict[str, torch.Tensor]:
        try:
            data = path.read_bytes()
        except OSError:
            raise _Corrupt(f"{path.name} is missing or unreadable") from None
        if _sha256(data) != expected:
            raise _Corrupt(f"{path.name} checksum mismatch")
        try:  # parse the very bytes that were verified; safetensors never unpickles
            return load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise _Corrupt(f"{path.name} is not a safetensors file: {exc}") from None

    # -- writing ------------------------------------------------------------------------------

    def put(
        self, entry_key: str, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]
    ) -> Entry:
        """Write an entry atomically (replacing any old one) and return it as :meth:`get` would."""
        target = self.path(entry_key)
        try:
            meta = json.loads(json.dumps(meta))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"store meta for {entry_key} is not plain JSON ({exc})") from None
        files = {
            f"{_check_name('group', g)}{_SUFFIX}": _tensor_bytes(g, t) for g, t in groups.items()
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry_key}-", dir=self.root))
        try:
            for name, data in files.items():
                _write_synced(tmp / name, data)
            checksums = {name: _sha256(data) for name, data in files.items()}
            doc = _meta_document(entry_key, meta, checksums)
            _write_synced(tmp / _META, json.dumps(doc, indent=1, sort_keys=True).encode())
            _fsync_dir(tmp)
            self._install(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        loaded = {n[: -len(_SUFFIX)]: load_safetensors(d) for n, d in files.items()}
        return Entry(entry_key, meta, loaded)

    def _install(self, tmp: Path, target: Path) -> None:
        """Rename ``tmp`` to ``target``; an old ``target`` is moved aside first, then deleted."""
        old = None
        if target.exists():
            old = self.root / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous entry back rather than lose it
                os.replace(old, target)
            raise
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, entry_key: str) -> None:
        """Delete an entry if present (moved aside first, so no half-deleted entry is visible)."""
        target = self.path(entry_key)
        if not target.exists():
            return
        trash = self.root / f".old-{entry_key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(target, trash)
        except FileNotFoundError:  # another process removed it first
            return
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
