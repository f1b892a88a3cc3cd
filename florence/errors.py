"""The library's user-facing error types.

Everything a user can cause with a wrong path, file, config key or sample derives from ``FlorenceError``; command-line
entry points turn exactly these into a one-line message and exit code 2. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations


class FlorenceError(Exception):
    """Base of the errors a user can fix: the message names the file, sample or key."""
