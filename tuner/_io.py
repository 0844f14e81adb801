"""Reading and writing the run folder's files safely.

- Writes are atomic and never follow a link: the bytes go to a new temporary file in the same
  folder, which then replaces the path (a rename replaces a directory entry, never the file a
  link points to); a path that is a symbolic link is refused, so a run folder received from
  someone else cannot make ``report`` overwrite files elsewhere.
- Reads of JSON the tool wrote (or a user received) are capped: a regular file (not a FIFO or a
  device), at most ``max_bytes``, nesting at most ``MAX_DEPTH`` deep; anything else is one line
  naming the file.
- :class:`RunLock`: one search at a time in a run folder, for the search's whole life (an
  ``flock`` on ``RUN/.lock``, opened without following a link; the kernel drops it when the
  process ends, even by SIGKILL, so a stale lock never blocks a ``--resume``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from tuner.errors import UsageError

__all__ = ["LOCK_NAME", "MAX_DEPTH", "MAX_JSON_BYTES", "RunLock", "clip", "clip_text", "read_json",
           "write_bytes", "write_json", "write_text"]

MAX_JSON_BYTES = 64 << 20  # trials.json of 10,000 trials with full histories stays far below
MAX_DEPTH = 32
LOCK_NAME = ".lock"  # in the run folder; not part of what a run wrote


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


class RunLock:
    """``with RunLock(run_dir):`` holds an exclusive lock on a run folder, creating the folder.

    A second search on the same folder gets one line at once (UsageError), not a wait. On
    release the lock file is removed (a search waiting on it re-checks that its lock is on the
    file at the path), and so are the folders it created if they hold nothing (the search was
    refused or interrupted before it wrote anything): the same command can simply run again.
    """

    def __init__(self, run: Path) -> None:
        self.run = Path(run)
        self.path = self.run / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # folders made here, deepest first

    def __enter__(self) -> RunLock:
        missing, folder = [], self.run
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        self.run.mkdir(parents=True, exist_ok=True)
        self._created = missing
        for _ in range(3):  # the lock file can be unlinked by a search releasing it meanwhile
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = os.pread(fd, 20, 0).decode("ascii", "replace").strip()
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise UsageError(f"{self.path}: cannot lock ({exc.strerror or exc})") from None
                by = f" (pid {owner})" if owner.isdigit() else ""
                raise UsageError(f"run folder {self.run} is in use by another search{by}: wait "
                                 "for it to end, or choose another --name") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fd = fd
                return self
            os.close(fd)
        raise UsageError(f"{self.path}: the lock file keeps being replaced: expected one "
                         "search at a time in this run folder")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{self.path}: is a symbolic link: refusing to lock through it "
                                 "(remove the link)") from None
            raise UsageError(f"{self.path}: cannot open the run lock "
                             f"({exc.strerror or exc})") from None

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
            for folder in self._created:
                folder.rmdir()  # OSError when not empty: it holds the run, keep it
        except OSError:
            pass  # a leftover empty folder or lock file is harmless
        finally:
            os.close(self._fd)
            self._fd = None
