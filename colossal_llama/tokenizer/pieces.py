"""Reading and writing ``{"piece": str}`` jsonl files, the input of tokenizer expansion.

Invariants of :class:`PiecesFile`: ``pieces`` holds each distinct piece once, in first-seen file order;
``duplicates`` counts the extra occurrences dropped to get there, so ``len(pieces) + duplicates`` equals
the number of records read.

Pieces are text. Word-start markers copied from a vocabulary are read as the space they stand for, whatever the
base tokenizer's kind (see :func:`marker_as_space`): ``'▁'`` anywhere (SentencePiece's spelling of a space) and a
leading ``'Ġ'`` (byte-level BPE's spelling of a word-start space), so ``'▁上海'``, ``'Ġ上海'`` and ``' 上海'`` are
the same piece. Kept literally, such a marker would become a token that never occurs in real text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from colossal_llama.utils.errors import DataError
from colossal_llama.utils.jsonl import iter_jsonl

SP_SPACE = "\u2581"  # '▁', SentencePiece's visible space
BYTE_LEVEL_SPACE = "\u0120"  # 'Ġ', byte-level BPE's visible space (byte 0x20 shifted into printable range)


def marker_as_space(piece: str) -> str:
    """``piece`` with its word-start markers as spaces: every ``'▁'``, and a leading ``'Ġ'`` (only leading: the
    letter is real text elsewhere, e.g. in Maltese words). Idempotent."""
    if piece.startswith(BYTE_LEVEL_SPACE):
        piece = " " + piece[1:]
    return piece.replace(SP_SPACE, " ")


@dataclass
class PiecesFile:
    """Distinct pieces of a pieces file (file order) and how many records and duplicates it held."""

    path: Path
    pieces: list[str]
    records: int
    duplicates: int


def read_pieces_file(path) -> PiecesFile:
    """Read ``{"piece": str}`` lines; malformed lines raise a one-line :class:`DataError` (``file:line``).

    A piece must be a non-empty string that is not whitespace only once its markers are read as spaces
    (:func:`marker_as_space`, which every returned piece has been through). Repeated pieces are not errors:
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
        piece = marker_as_space(piece)
        if not piece.strip():
            raise DataError(path, line_no, "piece", "empty or whitespace-only piece (a marker '▁' or 'Ġ' is a "
                                                    "space)")
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
