"""User-facing errors of the data package; all derive from :class:`florence.errors.FlorenceError`.

- :class:`DataConfigError`: a ``data:`` config section (or an eval/predict option) that cannot work; the message starts
  with the dotted key (``data.sources[0].pth: unknown key (known: ...)``).
- :class:`DataFileError`: a data file that cannot be read as what it claims to be (a table row with more fields
  than its header, a class-name or template file without entries); the message names the file (and line).
- :class:`DataNotFound`: a data file or folder that does not exist; the message names the path.

Each also derives from the built-in type that code written before these existed catches (``ValueError``,
``FileNotFoundError``). A single bad *sample* is not one of these: it follows the bad-sample policy
(:mod:`florence.data.bad_samples`).
"""
from __future__ import annotations

from florence.errors import FlorenceError


class DataConfigError(FlorenceError, ValueError):
    """A data config key or value is invalid; the message starts with the dotted key."""


class DataFileError(FlorenceError, ValueError):
    """A data file is malformed; the message names the file and, where there is one, the line."""


class DataNotFound(FlorenceError, FileNotFoundError):
    """A data file or folder is missing; the message names the path."""
