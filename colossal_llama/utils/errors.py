"""User-facing errors: one line that names the file, line and field, never a traceback."""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable, Optional

PEER_ERROR_DELAY_S = 5.0  # a non-zero rank's grace period before printing an error rank 0 probably printed


class UserInputError(Exception):
    """Bad input from the user (paths, flags, data files). Printed as one line by :func:`cli_entry`."""


class DataError(UserInputError):
    """A malformed record in a data file, located as ``file:line: field: problem``."""

    def __init__(self, path: str, line: Optional[int], field: Optional[str], problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")

    def __reduce__(self):  # raised in a tokenising worker, it is pickled back to the parent
        return type(self), (self.path, self.line, self.field, self.problem)


def damaged_file(path, kind: str, detail: str) -> UserInputError:
    """The one wording for a file cut short or corrupted (full disk, interrupted copy): names the file."""
    return UserInputError(f"{path}: truncated or corrupt {kind} file ({detail})")


def report_user_error(err: UserInputError, environ=os.environ) -> None:
    """Print ``error: <message>`` on stderr, once for a whole launch.

    Under ``torchrun`` / ``colossalai run`` every rank usually meets the same error (the same flags and data). Rank
    0 prints it; another rank waits a moment first (the launcher normally stops it meanwhile, once rank 0 has exited)
    and then prints it prefixed with its number, so an error met by one rank alone (a file missing on one node)
    still shows."""
    rank = int(environ.get("RANK", "0") or 0)
    if rank == 0:
        print(f"error: {err}", file=sys.stderr)
        return
    time.sleep(PEER_ERROR_DELAY_S)
    print(f"error (rank {rank}): {err}", file=sys.stderr)


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI ``main`` so a :class:`UserInputError` prints ``error: <message>`` (see
    :func:`report_user_error`) and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserInputError as err:
            report_user_error(err)
            raise SystemExit(2) from None

    return wrapper
