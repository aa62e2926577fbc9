"""Read and validate input jsonl rows, streaming, in the main process, so every error names its ``file:line``.

Each line is decoded and parsed on its own (not through a text stream), so with ``--skip_invalid`` a
non-UTF-8 or broken line is skipped and counted while the rest of the file is still read. A row with no text at
all (pre-training ``source`` and ``target`` both empty) is not malformed: it is skipped and counted in every mode.
Only the lines of this run's :class:`~colossal_llama.dataset.config.Shard` are parsed.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from tqdm import tqdm

from colossal_llama.dataset.chat_templates import ASSISTANT, MessageError, validate_messages
from colossal_llama.dataset.config import Shard
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import find_jsonl_files, iter_lines

DEFAULT_SFT_CATEGORY = "default"
EXAMPLES_PER_REASON = 10


class FieldError(Exception):
    """A row-level problem: ``field`` that is wrong, what is wrong, and a short counter key ``reason``."""

    def __init__(self, field: str | None, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason


class EmptyRow(FieldError):
    """A well-formed row without text: skipped and counted even under ``--strict``."""


@dataclass
class ReadLog:
    """What reading saw: lines of this shard, valid documents, and what was skipped, by reason."""

    files: list[Path]
    lines_read: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)  # "file:line: field: problem", <= 10 per reason

    def skip(self, located: DataError, reason: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= EXAMPLES_PER_REASON:
            self.skipped_examples.append(str(located))


class Row(NamedTuple):
    """One valid input document: where it is (index into :attr:`ReadLog.files`, 1-based line), its size in the
    file, its category and its text fields (``(source, target)`` or ``(messages,)``)."""

    file: int
    line: int
    nbytes: int
    category: str
    fields: tuple


def _check_fields(row, required: dict, optional: dict) -> None:
    """Row is an object whose keys are ``required`` (+ maybe ``optional``), values of the given types."""
    if not isinstance(row, dict):
        raise FieldError(None, f"expected a JSON object, got {type(row).__name__}", "wrong_type")
    for name in required:
        if name not in row:
            raise FieldError(name, "missing field", "missing_field")
    if len(row) > len(required):
        extra = sorted(set(row) - set(required) - set(optional))
        if extra:
            raise FieldError(extra[0], "unexpected field", "extra_field")
    for types in (required, optional):
        for name, typ in types.items():
            if name in row and not isinstance(row[name], typ):
                raise FieldError(name, f"expected {typ.__name__}, got {type(row[name]).__name__}", "wrong_type")


def validate_pretrain_row(row) -> tuple[str, tuple]:
    """``{source: str, target: str, category: non-empty str}`` with some text -> ``(category, (source, target))``.

    Both texts empty (or whitespace): :class:`EmptyRow`. A source without a target is an error (nothing would
    be trained on but the EOS): most likely the fields are swapped.
    """
    _check_fields(row, {"source": str, "target": str, "category": str}, {})
    if not row["target"].strip():
        if not row["source"].strip():
            raise EmptyRow(None, "no text (source and target are empty)", "empty_text")
        raise FieldError("target", "empty target (the source is not empty)", "empty_target")
    if not row["category"].strip():
        raise FieldError("category", "empty category", "empty_category")
    return row["category"], (row["source"], row["target"])



def validate_sft_row(row) -> tuple[str, tuple]:
    """``{messages: [{from, content}, ...], category?: str}`` -> ``(category, (messages,))``."""
    _check_fields(row, {"messages": list}, {"category": str})
    try:
        validate_messages(row["messages"], ends_with=ASSISTANT)
    except MessageError as err:
        raise FieldError(err.field, err.problem, err.reason) from None
    category = row.get("category", DEFAULT_SFT_CATEGORY)
    if not category.strip():
        raise FieldError("category", "empty category", "empty_category")
    return category, (row["messages"],)



def _parse_line(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FieldError(None, f"not valid UTF-8 ({err.reason} at byte {err.start})", "not_utf8") from None
    text = text.rstrip("\r\n")  # so the column of an error at the end of the line is on this line
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FieldError(None, f"invalid JSON ({err.msg}, column {err.pos + 1})", "invalid_json") from None


def input_files(input_dirs: list) -> list[Path]:
    """The jsonl files of ``--data_input_dirs`` in their fixed (sorted) order; a file named twice is an error."""
    files = find_jsonl_files(input_dirs)
    seen: dict[Path, Path] = {}
    for path in files:  # overlapping inputs (a, a/sub) would silently duplicate documents
        if path.resolve() in seen:
            raise UserInputError(f"{path}: given twice by --data_input_dirs (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    return files


def read_rows(log: ReadLog, validate: Callable[[object], tuple], strict: bool, shard: Shard) -> Iterator[Row]:
    """Valid rows of this shard's lines of ``log.files``, in file then line order, streaming.

    ``strict``: the first malformed line raises :class:`DataError` (``file:line: field: problem``); otherwise it
    is skipped and counted under its reason in ``log``. Rows without text are always skipped and counted.
    """
    with tqdm(desc="read", unit=" rows", unit_scale=True, mininterval=1.0) as bar:  # closed even on an error
        for file_index, path in enumerate(log.files):
            for line_no, raw in iter_lines(path):
                if not shard.owns(file_index, line_no) or not raw.strip():
                    continue
                log.lines_read += 1
                if not log.lines_read % 1000:
                    bar.update(1000)
                try:
                    category, fields = validate(_parse_line(raw))
                except FieldError as err:
                    located = DataError(path, line_no, err.field, err.problem)
                    if strict and not isinstance(err, EmptyRow):
                        raise located from None
                    log.skip(located, err.reason)
                    continue
                log.documents += 1
                yield Row(file_index, line_no, len(raw), category, fields)
        bar.update(log.lines_read % 1000)
