"""Read prepared output back: the manifest, the arrow parts, and the documents packed in a row."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from colossal_llama.utils.errors import UserInputError


def part_dirs(path) -> list[Path]:
    """``OUT/arrow`` (all its parts, sorted) or one ``OUT/arrow/part-XXXXX`` -> list of part dirs."""
    path = Path(path)
    if (path / "state.json").is_file():
        return [path]
    parts = sorted(p for p in path.glob("part-*") if (p / "state.json").is_file())
    if not parts:
        raise UserInputError(f"{path}: neither a prepared arrow part nor a dir of parts")
    return parts


def load_manifest(part_dir) -> dict:
    """The manifest of the output a part belongs to (``part.parent.parent / manifest.json``)."""
    path = Path(part_dir).parent.parent / "manifest.json"
    if not path.is_file():
        raise UserInputError(f"{path}: missing; {part_dir} is not complete prepared output")
    return json.loads(path.read_text(encoding="utf-8"))


def load_part(part_dir) -> Dataset:
    return load_from_disk(str(part_dir))


def document_spans(position_ids) -> list[tuple[int, int]]:
    """``[start, end)`` of each document piece in a packed row: a piece starts where position_ids == 0."""
    pos = np.asarray(position_ids)
    starts = np.flatnonzero(pos == 0).tolist()
    return list(zip(starts, starts[1:] + [len(pos)]))
