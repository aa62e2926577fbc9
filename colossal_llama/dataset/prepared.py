"""Read prepared output back: the manifest, the arrow parts, and the documents packed in a row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from colossal_llama.dataset.config import FORMAT_VERSION
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json


def part_dirs(path) -> list[Path]:
    """``OUT/arrow`` (all its parts, sorted) or one ``OUT/arrow/part-XXXXX`` -> list of part dirs."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: directory does not exist")
    if (path / "state.json").is_file():
        return [path]
    parts = sorted(p for p in path.glob("part-*") if (p / "state.json").is_file())
    if not parts:
        raise UserInputError(f"{path}: neither a prepared arrow part (datasets.save_to_disk) nor a dir of part-* dirs")
    return parts


def manifest_path_of(part_dir) -> Path:
    """Where the manifest of a part is: ``OUT/arrow/part-XXXXX`` -> ``OUT/manifest.json``."""
    return Path(part_dir).parent.parent / "manifest.json"


def read_manifest(manifest_path) -> dict:
    """The manifest at ``manifest_path``, with the keys readers rely on checked. One-line errors."""
    manifest_path = Path(manifest_path)
    if not manifest_path.is_file():
        raise UserInputError(
            f"{manifest_path}: manifest missing (data preparation did not finish, or the path is not OUT/arrow/part-*)"
        )
    manifest = read_json(manifest_path)
    for key in ("format_version", "kind", "tokenizer_fingerprint", "vocab_size", "max_length", "parts"):
        if key not in manifest:
            raise UserInputError(f"{manifest_path}: {key}: missing")
    if manifest["format_version"] != FORMAT_VERSION:
        raise UserInputError(
            f"{manifest_path}: format_version: {manifest['format_version']} (this version reads {FORMAT_VERSION})"
        )
    return manifest


def load_manifest(part_dir) -> dict:
    """The manifest of the output a part belongs to."""
    return read_manifest(manifest_path_of(part_dir))


def load_part(part_dir) -> Dataset:
    return load_from_disk(str(part_dir))


def document_spans(position_ids) -> list[tuple[int, int]]:
    """``[start, end)`` of each document piece in a packed row: a piece starts where position_ids == 0."""
    pos = np.asarray(position_ids)
    starts = np.flatnonzero(pos == 0).tolist()
    return list(zip(starts, starts[1:] + [len(pos)]))
