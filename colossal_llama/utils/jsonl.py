"""Reading jsonl files (plain, ``.gz``, ``.zst``) with exact ``file:line`` error locations."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import IO, Iterator, Tuple

from colossal_llama.utils.errors import DataError, UserInputError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed text file for strict UTF-8 reading."""
    path = Path(path)
    if path.name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="\n")


def iter_jsonl(path: Path) -> Iterator[Tuple[int, object]]:
    """Yield ``(line_number, parsed_value)`` for every non-blank line of ``path`` (1-based lines).

    Raises :class:`DataError` naming ``path:line`` for invalid JSON or invalid UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    with open_text(path) as fh:
        line_no = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as err:
                raise DataError(path, line_no + 1, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, line_no, None, f"invalid JSON ({err.msg}, column {err.colno})") from None


def find_jsonl_files(input_dirs: list) -> list:
    """All jsonl files under each of ``input_dirs`` (recursively, sorted). A dir with none is an error."""
    files = []
    for d in input_dirs:
        d = Path(d)
        if d.is_file():
            files.append(d)
            continue
        if not d.is_dir():
            raise UserInputError(f"{d}: input directory does not exist")
        found = sorted(p for p in d.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        if not found:
            raise UserInputError(f"{d}: no jsonl files (looked for {', '.join(JSONL_SUFFIXES)})")
        files.extend(found)
    return files
