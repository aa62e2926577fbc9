"""Reading and writing ``{"piece": str}`` jsonl files, the input of tokenizer expansion.

Invariants of :class:`PiecesFile`: ``pieces`` holds each distinct piece once, in first-seen file order;
``duplicates`` counts the extra occurrences dropped to get there, so ``len(pieces) + duplicates`` equals
the number of records read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from colossal_llama.utils.errors import DataError
from colossal_llama.utils.jsonl import iter_jsonl


@dataclass
class PiecesFile:
    """Distinct pieces of a pieces file (file order) and how many records and duplicates it held."""

    path: Path
    pieces: list[str]
    records: int
    duplicates: int


def read_pieces_file(path) -> PiecesFile:
    """Read ``{"piece": str}`` lines; malformed lines raise a one-line :class:`DataError` (``file:line``).

    A piece must be a non-empty string that is not whitespace only. Repeated pieces are not errors:
    they are counted in ``duplicates`` and kept once (first occurrence).
    """
    path = Path(path)
    pieces: list[str] = []
    seen: set[str] = set()
    records = 0
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise DataError(path, line_no, None, f"expected a JSON object, got {type(record).__name__}")
        if "piece" not in record:
            raise DataError(path, line_no, "piece", "missing")
        piece = record["piece"]
        if not isinstance(piece, str):
            raise DataError(path, line_no, "piece", f"must be a string, got {type(piece).__name__}")
        if not piece.strip():
            raise DataError(path, line_no, "piece", "empty or whitespace-only piece")
        records += 1
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return PiecesFile(path=path, pieces=pieces, records=records, duplicates=records - len(pieces))


def write_pieces_file(path, pieces: list[str]) -> None:
    """Write one ``{"piece": p}`` line per piece (UTF-8, not ASCII-escaped), via tmp + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for piece in pieces:
            fh.write(json.dumps({"piece": piece}, ensure_ascii=False) + "\n")
    tmp.replace(path)
