"""Read and validate input jsonl rows in the main process, so every error names its exact ``file:line``.

Each line is decoded and parsed on its own (not through a text stream), so with ``--skip_invalid`` a
non-UTF-8 or broken line is skipped and counted while the rest of the file is still read.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from colossal_llama.dataset.chat_templates import ASSISTANT, MessageError, validate_messages
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import find_jsonl_files, open_text

DEFAULT_SFT_CATEGORY = "default"


class FieldError(Exception):
    """A row-level problem: ``field`` that is wrong, what is wrong, and a short counter key ``reason``."""

    def __init__(self, field: str | None, problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field, problem, reason


@dataclass
class Records:
    """Valid rows as columns (one entry per document) plus what was skipped, by reason."""

    columns: dict[str, list] = field(default_factory=dict)
    lines_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)  # first few "file:line: field: problem"

    @property
    def num_documents(self) -> int:
        return len(self.columns.get("doc_id", []))


def _check_fields(row, required: dict, optional: dict) -> None:
    """Row is an object whose keys are ``required`` (+ maybe ``optional``), values of the given types."""
    if not isinstance(row, dict):
        raise FieldError(None, f"expected a JSON object, got {type(row).__name__}", "wrong_type")
    for name in required:
        if name not in row:
            raise FieldError(name, "missing field", "missing_field")
    extra = sorted(set(row) - set(required) - set(optional))
    if extra:
        raise FieldError(extra[0], "unexpected field", "extra_field")
    for name, typ in {**required, **optional}.items():
        if name in row and not isinstance(row[name], typ):
            raise FieldError(name, f"expected {typ.__name__}, got {type(row[name]).__name__}", "wrong_type")


def validate_pretrain_row(row) -> dict:
    """``{source: str, target: non-empty str, category: non-empty str}`` -> the column values."""
    _check_fields(row, {"source": str, "target": str, "category": str}, {})
    if not row["target"].strip():
        raise FieldError("target", "empty target", "empty_target")
    if not row["category"].strip():
        raise FieldError("category", "empty category", "empty_category")
    return {"source": row["source"], "target": row["target"], "category": row["category"]}


def validate_sft_row(row) -> dict:
    """``{messages: [{from, content}, ...], category?: str}`` -> the column values."""
    _check_fields(row, {"messages": list}, {"category": str})
    try:
        validate_messages(row["messages"], ends_with=ASSISTANT)
    except MessageError as err:
        raise FieldError(err.field, err.problem, err.reason) from None
    category = row.get("category", DEFAULT_SFT_CATEGORY)
    if not category.strip():
        raise FieldError("category", "empty category", "empty_category")
    return {"messages": row["messages"], "category": category}


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Binary lines of a plain / .gz / .zst file."""
    with open_text(path) as fh:
        raw = fh.buffer
        if not hasattr(raw, "peek"):  # zstd's reader cannot iterate lines by itself
            raw = io.BufferedReader(raw)
        yield from raw


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


def _add_row(records: Records, path: Path, line_no: int, raw: bytes, validate, strict: bool) -> None:
    try:
        values = validate(_parse_line(raw))
    except FieldError as err:
        located = DataError(path, line_no, err.field, err.problem)
        if strict:
            raise located from None
        records.skipped[err.reason] += 1
        if len(records.skipped_examples) < 10:
            records.skipped_examples.append(str(located))
        return
    for name, value in {"doc_id": f"{path}:{line_no}", **values}.items():
        records.columns.setdefault(name, []).append(value)


def read_records(input_dirs: list, validate: Callable[[object], dict], strict: bool) -> Records:
    """Read every jsonl file under ``input_dirs`` (sorted), validating each non-blank line.

    ``strict``: the first bad line raises :class:`DataError` (``file:line: field: problem``).
    Otherwise it is skipped and counted under its reason. Raises if no valid row remains.
    """
    files = find_jsonl_files(input_dirs)
    seen: dict[Path, Path] = {}
    for path in files:  # overlapping inputs (a, a/sub) would silently duplicate documents
        if path.resolve() in seen:
            raise UserInputError(f"{path}: given twice by --data_input_dirs (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    records = Records()
    with tqdm(desc="read", unit=" rows", mininterval=1.0) as bar:  # closed (newline) even on an error
        for path in files:
            for line_no, raw in enumerate(_raw_lines(path), start=1):
                if not raw.strip():
                    continue
                records.lines_read += 1
                bar.update()
                _add_row(records, path, line_no, raw, validate, strict)
    if records.num_documents == 0:
        where = ", ".join(str(p) for p in files)
        detail = f" ({sum(records.skipped.values())} invalid rows skipped)" if records.skipped else ""
        raise UserInputError(f"{where}: no valid rows{detail}")
    return records
