"""Progress lines on stderr for long work (victim training, trigger building).

On a terminal one line updates in place; elsewhere (a log file, CI) a line is printed every
fifth of the work, so logs stay short.
"""

from __future__ import annotations

import sys
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``VERB LABEL: UNIT i/N loss L`` on ``stream`` (stderr by default)."""

    def __init__(self, label: str, total: int, enabled: bool = True, *, stream: TextIO | None = None,
                 verb: str = "training", unit: str = "epoch") -> None:
        self.label, self.total, self.enabled = label, max(1, total), enabled
        self.verb, self.unit = verb, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, self.total // 5)

    def update(self, i: int, loss: float) -> None:
        if not self.enabled:
            return
        text = f"{self.verb} {self.label}: {self.unit} {i}/{self.total} loss {loss:.3f}"
        if self.tty:
            end = "\n" if i == self.total else ""
            self.stream.write(f"\r{text}\x1b[K{end}")
        elif i % self.every == 0 or i == self.total:
            self.stream.write(text + "\n")
        self.stream.flush()
