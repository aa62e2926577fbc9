"""User-facing errors: one line that names the file, line and field, never a traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional


class UserInputError(Exception):
    """Bad input from the user (paths, flags, data files). Printed as one line by :func:`cli_entry`."""


class DataError(UserInputError):
    """A malformed record in a data file, located as ``file:line: field: problem``."""

    def __init__(self, path: str, line: Optional[int], field: Optional[str], problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


def damaged_file(path, kind: str, detail: str) -> UserInputError:
    """The one wording for a file cut short or corrupted (full disk, interrupted copy): names the file."""
    return UserInputError(f"{path}: truncated or corrupt {kind} file ({detail})")


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI ``main`` so a :class:`UserInputError` prints ``error: <message>`` and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
