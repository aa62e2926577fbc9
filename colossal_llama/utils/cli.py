"""Argument-parsing helpers shared by every command line, and typed configs that are their command lines
(:func:`flag`, :func:`add_flags`: a default is written once, in the dataclass)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Callable, List, Optional

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


# ---------------------------------------------------------------------------------------------- typed configs
def flag(default=dataclasses.MISSING, help: str = "", aliases: tuple = (), choices: Optional[tuple] = None,
         parse: Optional[Callable[[str], object]] = None, name: Optional[str] = None):
    """A dataclass field that is also the command-line flag ``--<name>`` (the field's name unless ``name`` is
    given; ``aliases`` are older spellings): the config *is* the command line, its default written once. A field
    without a default is a required flag; ``parse`` turns the flag's one string into the field's value (e.g. a
    comma-separated list); a field made without :func:`flag` is not a flag."""
    metadata = {"help": help, "aliases": aliases, "choices": choices, "required": default is dataclasses.MISSING,
                "parse": parse, "name": name}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag_type(annotation):
    """(argparse type, is_bool, is_list) of a field annotation such as ``Optional[int]`` or ``List[str]``."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (list, List):
        return args[0], False, True
    if origin is typing.Union:
        annotation = args[0]
    if annotation is bool:
        return str2bool, True, False
    return annotation, False, False


def flag_fields(config_cls) -> List[dataclasses.Field]:
    """The fields of ``config_cls`` made with :func:`flag`."""
    return [f for f in dataclasses.fields(config_cls) if "required" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per :func:`flag` field of ``config_cls`` (names, defaults, help, aliases, choices)."""
    hints = typing.get_type_hints(config_cls)
    for f in flag_fields(config_cls):
        meta = f.metadata
        names = (f"--{meta['name'] or f.name}", *meta["aliases"])
        kind, is_bool, is_list = _flag_type(hints[f.name])
        kwargs = {"dest": f.name, "help": meta["help"]}
        if meta["required"]:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if meta["parse"] is not None:
            kwargs.update(type=meta["parse"], choices=meta["choices"])
        elif is_bool:  # ``--flag`` alone means true; ``--flag False`` / ``--flag true`` too (older scripts)
            kwargs.update(nargs="?", const=True, type=str2bool)
        else:
            kwargs.update(type=kind, choices=meta["choices"], **({"nargs": "+"} if is_list else {}))
        parser.add_argument(*names, **kwargs)


def config_from(args: argparse.Namespace, config_cls, **others):
    """``config_cls`` from the parsed flags of :func:`add_flags` (``others``: its fields that are not flags)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in flag_fields(config_cls)}, **others)
