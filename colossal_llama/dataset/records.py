"""Read and validate input jsonl rows, streaming, in the main process, so every error names its ``file:line``.

Lines are read in batches of :data:`BATCH_LINES` (fewer when they reach :data:`BATCH_BYTES`), each line at most
``MAX_LINE_BYTES`` (a longer one is a located error or a counted skip, ``line_too_long``). A batch of
pre-training lines is first parsed in one go by Arrow's JSON reader (C++, no Python object per row) and checked
with vectorised rules; a batch with anything
that is not a clean row (a parse error, a missing, extra or mistyped field, an empty text or category) is parsed
again line by line, by the exact path below, which names the ``file:line`` and field of every problem. So both
paths accept exactly the same rows (tests check that they agree), and the fast one is only a shortcut.

On the exact path each line is decoded and parsed on its own (not through a text stream), so with
``--skip_invalid`` a non-UTF-8 or broken line is skipped and counted while the rest of the file is still read. A
row with no text at all (pre-training ``source`` and ``target`` both empty) is not malformed: it is skipped and
counted in every mode. Only the lines of this run's :class:`~colossal_llama.dataset.config.Shard` are parsed.
A UTF-8 BOM is accepted at the start of a file only (both paths read the first line without it).
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from tqdm import tqdm

from colossal_llama.dataset.chat_templates import ASSISTANT, MessageError, validate_messages
from colossal_llama.dataset.config import Shard
from colossal_llama.utils.errors import DataError, UserInputError
from colossal_llama.utils.jsonl import BOM, FoundFiles, OverlongLine, iter_lines, not_utf8, scan_jsonl_files

logger = logging.getLogger(__name__)  # (``log`` is the ReadLog the readers take)

DEFAULT_SFT_CATEGORY = "default"
EXAMPLES_PER_REASON = 10
BATCH_LINES = 1000  # lines read, parsed and validated together (and rows per raw Arrow record batch)
# ... unless they hold more bytes: a batch is cut after the line that reaches BATCH_BYTES, so it holds less than
# BATCH_BYTES + MAX_LINE_BYTES (utils/jsonl.py), far below the 2 GiB that Arrow's JSON reader can take at once.
BATCH_BYTES = 256 << 20
PRETRAIN_FIELDS = ("source", "target")


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
    files_ignored: int = 0  # files of the --data_input_dirs folders not read: not JSON lines by name
    lines_read: int = 0
    documents: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)  # "file:line: field: problem", <= 10 per reason

    def skip(self, located: DataError, reason: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= EXAMPLES_PER_REASON:
            self.skipped_examples.append(str(located))


@dataclass
class RowBatch:
    """Valid rows of one stretch of one input file, as columns (Python lists, or Arrow arrays from the fast path).

    ``file`` indexes :attr:`ReadLog.files`; ``line`` are 1-based line numbers; ``fields`` maps each text field
    (``source``/``target``, or ``messages``) to its column; ``nbytes`` is the size of those lines in the file."""

    file: int
    line: list
    category: list | pa.Array
    fields: dict
    nbytes: int

    def __len__(self) -> int:
        return len(self.line)


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
    for name in ("source", "target", "category"):
        if (problem := not_utf8(row[name])) is not None:
            raise FieldError(name, problem, "not_utf8")
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
    if (problem := not_utf8(category)) is not None:
        raise FieldError("category", problem, "not_utf8")
    return category, (row["messages"],)



def _parse_line(raw: bytes | OverlongLine):
    if isinstance(raw, OverlongLine):
        raise FieldError(None, raw.problem, "line_too_long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FieldError(None, f"not valid UTF-8 ({err.reason} at byte {err.start})", "not_utf8") from None
    text = text.rstrip("\r\n")  # so the column of an error at the end of the line is on this line
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise FieldError(None, f"invalid JSON ({err.msg}, column {err.pos + 1})", "invalid_json") from None
    except RecursionError:
        raise FieldError(None, "invalid JSON (nested too deeply)", "invalid_json") from None


def input_files(input_dirs: list) -> FoundFiles:
    """The jsonl files of ``--data_input_dirs`` in their fixed (sorted) order, and the folders' files not read
    (warned about: see :func:`~colossal_llama.utils.jsonl.scan_jsonl_files`); a file named twice is an error, and
    so is a path that is not valid UTF-8 (the mirror and the manifest name every file: refused before any work)."""
    found = scan_jsonl_files(input_dirs)
    seen: dict[Path, Path] = {}
    for path in found.files:  # overlapping inputs (a, a/sub) would silently duplicate documents
        if not_utf8(str(path)) is not None:
            raise UserInputError(f"{str(path)!r}: the file name is not valid UTF-8 (rename the file)")
        if path.resolve() in seen:
            raise UserInputError(f"{path}: given twice by --data_input_dirs (also as {seen[path.resolve()]})")
        seen[path.resolve()] = path
    return found


def read_batches(log: ReadLog, kind: str, strict: bool, shard: Shard) -> Iterator[RowBatch]:
    """Valid rows of this shard's lines of ``log.files`` (``kind``: pretrain or sft), in file then line order,
    streaming, a batch of up to :data:`BATCH_LINES` lines at a time.

    ``strict``: the first malformed line raises :class:`DataError` (``file:line: field: problem``); otherwise it
    is skipped and counted under its reason in ``log``. Rows without text are always skipped and counted.
    """
    owns = _line_rule(log.files, shard)
    with tqdm(desc="read", unit=" rows", unit_scale=True, mininterval=1.0) as bar:  # closed even on an error
        for file_index, path in enumerate(log.files):
            if not owns(file_index, None):
                continue
            for chunk in _chunks(iter_lines(path)):
                kept = [(n, raw) for n, raw in chunk if owns(file_index, n) and _not_blank(raw)]
                if not kept:
                    continue
                log.lines_read += len(kept)
                bar.update(len(kept))
                batch = _pretrain_columns(file_index, kept) if kind == "pretrain" else None
                if batch is None:
                    batch = _checked_lines(log, kind, strict, path, file_index, kept)
                else:
                    log.documents += len(batch)
                if len(batch):
                    yield batch


def _line_rule(files: list[Path], shard: Shard):
    """``owns(file index, line)``: whether this shard takes that line (``line`` None: any line of that file), by
    whole files where the inputs split evenly into them, else by line (see :class:`Shard`); logged."""
    if shard.count == 1:
        return lambda file, line: True
    sizes = [path.stat().st_size for path in files]
    whole = shard.whole_files(sizes)
    if whole is None:
        logger.info("shard %d of %d: its lines of all %d input files (they do not split evenly into whole files)",
                    shard.index, shard.count, len(files))
        return lambda file, line: line is None or shard.owns(file, line)
    logger.info("shard %d of %d: %d of the %d input files whole (%s of %s bytes)", shard.index, shard.count,
                len(whole), len(files), f"{sum(sizes[f] for f in whole):,}", f"{sum(sizes):,}")
    return lambda file, line: file in whole


def _chunks(lines: Iterator[tuple[int, bytes]]) -> Iterator[list[tuple[int, bytes]]]:
    """``lines`` in lists of :data:`BATCH_LINES` lines, or fewer once they reach :data:`BATCH_BYTES` bytes."""
    chunk, size = [], 0
    for line in lines:
        chunk.append(line)
        size += len(line[1])
        if len(chunk) == BATCH_LINES or size >= BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _not_blank(raw: bytes | OverlongLine) -> bool:
    return isinstance(raw, OverlongLine) or bool(raw.strip())


def _checked_lines(log: ReadLog, kind: str, strict: bool, path: Path, file_index: int,
                   lines: list[tuple[int, bytes]]) -> RowBatch:
    """The exact path: every line parsed and validated on its own, problems located and raised or counted."""
    validate, names = _KINDS[kind]
    batch = RowBatch(file_index, [], [], {}, 0)
    columns = None
    for line_no, raw in lines:
        try:
            category, fields = validate(_parse_line(raw))
        except FieldError as err:
            located = DataError(path, line_no, err.field, err.problem)
            if strict and not isinstance(err, EmptyRow):
                raise located from None
            log.skip(located, err.reason)
            continue
        log.documents += 1
        columns = columns or [[] for _ in fields]
        for column, value in zip(columns, fields):
            column.append(value)
        batch.line.append(line_no)
        batch.category.append(category)
        batch.nbytes += len(raw)
    batch.fields = dict(zip(names, columns or [[] for _ in names]))
    return batch


_KINDS = {"pretrain": (validate_pretrain_row, PRETRAIN_FIELDS), "sft": (validate_sft_row, ("messages",))}
_PRETRAIN_PARSE = pa_json.ParseOptions(
    explicit_schema=pa.schema([(name, pa.string()) for name in (*PRETRAIN_FIELDS, "category")]),
    unexpected_field_behavior="error")


def _blank(column: pa.Array) -> pa.Array:
    """True where ``str.strip()`` would leave nothing (Arrow's Unicode whitespace is Python's: a test checks)."""
    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)


def _pretrain_columns(file_index: int, lines: list[tuple[int, bytes]]) -> RowBatch | None:
    """The fast path: ``lines`` parsed by Arrow in one go, when every one is a clean pre-training row (exactly
    one JSON object per line, valid UTF-8, the three fields as strings and nothing else, a non-empty target and
    category); otherwise None, and the lines take the exact path.

    Arrow skips a UTF-8 BOM that Python's parser refuses, so a batch holding those bytes anywhere takes the exact
    path (the one BOM accepted, at the start of a file, is already gone: see :func:`iter_lines`)."""
    if any(isinstance(raw, OverlongLine) for _, raw in lines):
        return None
    data = b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for _, raw in lines)
    if BOM in data:
        return None
    try:
        data.decode("utf-8")  # Arrow does not check the strings' encoding
        table = pa_json.read_json(io.BytesIO(data), parse_options=_PRETRAIN_PARSE,
                                  read_options=pa_json.ReadOptions(use_threads=False, block_size=len(data) + 1))
    except (UnicodeDecodeError, pa.ArrowInvalid):
        return None
    if table.num_rows != len(lines) or any(column.null_count for column in table.columns):
        return None  # two objects on a line, a missing field or a null
    columns = {name: table.column(name).combine_chunks() for name in table.column_names}
    if pc.any(pc.or_(_blank(columns["target"]), _blank(columns["category"]))).as_py():
        return None  # an empty row, an empty target or category: counted or refused by the exact path
    return RowBatch(file_index, [n for n, _ in lines], columns.pop("category"), columns, len(data))
