"""The one error type the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: printed as one line on stderr, exit status 2, nothing started."""
