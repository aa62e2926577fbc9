"""Argument-parsing helpers shared by every command line."""
from __future__ import annotations

import argparse

from colossal_llama.utils.errors import UserInputError

TRUE_WORDS = {"true", "1", "yes", "y", "on", "t"}
FALSE_WORDS = {"false", "0", "no", "n", "off", "f"}


def str2bool(value: str) -> bool:
    """argparse type for booleans: ``True/False/1/0/yes/no/on/off`` (any case); anything else is an error.

    ``type=bool`` would turn the string "False" into True, the original scripts' bug.
    """
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False/1/0/yes/no), got {value!r}")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are :class:`UserInputError` (one line through ``cli_entry``), not a usage
    dump and ``SystemExit`` from every rank of a distributed job."""

    def error(self, message: str):
        raise UserInputError(f"{self.prog}: {message} (see --help)")
