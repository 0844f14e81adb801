"""Reading and writing the run folder's files safely.

- Writes are atomic and never follow a link: the bytes go to a new temporary file in the same
  folder, which then replaces the path (a rename replaces a directory entry, never the file a
  link points to); a path that is a symbolic link is refused, so a run folder received from
  someone else cannot make ``report`` overwrite files elsewhere.
- Reads of JSON the tool wrote (or a user received) are capped: a regular file (not a FIFO or a
  device), at most ``max_bytes``, nesting at most ``MAX_DEPTH`` deep; anything else is one line
  naming the file.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from tuner.errors import UsageError

__all__ = ["MAX_DEPTH", "MAX_JSON_BYTES", "clip", "clip_text", "read_json", "write_bytes", "write_json",
           "write_text"]

MAX_JSON_BYTES = 64 << 20  # trials.json of 10,000 trials with full histories stays far below
MAX_DEPTH = 32


def clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_text(text: Any, limit: int = 120) -> str:
    """``text`` on one line, cut to ``limit`` characters (for messages quoting other messages)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``; refuse a symbolic link."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"{path}: is a symbolic link: refusing to write through it "
                         "(remove the link, or write the report into another folder)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, stopping past ``limit``."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, d + 1) for c in children)
    return deepest


def read_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON in ``path``; UsageError naming the file when it is not a small regular file
    holding JSON nested at most ``MAX_DEPTH`` deep."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path}: not a regular file: expected the JSON file a run wrote")
    if st.st_size > max_bytes:
        raise UsageError(f"{path}: {st.st_size} bytes: expected at most {max_bytes}")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(max_bytes + 1))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not valid JSON ({clip_text(exc)})") from None
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise UsageError(f"{path}: JSON nested deeper than {MAX_DEPTH} levels")
    return data
