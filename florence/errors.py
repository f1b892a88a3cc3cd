"""The library's user-facing error types.

Everything a user can cause with a wrong path, file, config key or sample derives from ``FlorenceError``; command-line
entry points turn exactly these into a one-line message and exit code 2. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations


class FlorenceError(Exception):
    """Base of the errors a user can fix: the message names the file, sample or key."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), for one-line errors that
    quote another library's multi-line message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
