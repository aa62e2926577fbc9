"""Cheap integrity checks of the files of a checkpoint (or a ``modeling/`` folder) before loading them.

A file cut short (full disk, interrupted copy) otherwise surfaces as a library traceback that names no file.
Checks read only what is needed to detect truncation: safetensors headers against the file size, the end-of-
archive record of ``torch.save`` zip files, and JSON parsing of the small files.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from colossal_llama.utils.errors import UserInputError

# Files written by torch.save (zip archives): optimizer states, the scheduler, per-rank RNG, .bin weights.
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TORCH_NAMES = ("lr_scheduler",)


class CheckpointDamaged(UserInputError):
    """``<file>: truncated or corrupt <kind> file (<detail>)``."""

    def __init__(self, path: Path, kind: str, detail: str):
        self.path = Path(path)
        super().__init__(f"{path}: truncated or corrupt {kind} file ({detail})")


def check_safetensors(path: Path) -> None:
    """The header parses and the file holds every byte the header promises."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointDamaged(path, "safetensors", f"{size} bytes")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 << 20):
            raise CheckpointDamaged(path, "safetensors", f"header of {header_len} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointDamaged(path, "safetensors", f"header: {err}") from None
    header.pop("__metadata__", None)
    data_end = 8 + header_len + max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_end > size:
        raise CheckpointDamaged(path, "safetensors", f"{size} bytes, the header describes {data_end}")


def check_torch_archive(path: Path) -> None:
    """A ``torch.save`` file: a zip whose central directory is intact and inside the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointDamaged(path, "torch.save", str(err)) from None
    if end > os.path.getsize(path):
        raise CheckpointDamaged(path, "torch.save", "data past the end of the file")


def check_json(path: Path) -> None:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointDamaged(path, "JSON", str(err)) from None


def check_file(path: Path) -> None:
    """Dispatch on the file name; files of other kinds (tokenizer models, text) are not checked."""
    name = path.name
    if name.endswith(".safetensors"):
        check_safetensors(path)
    elif name.endswith(".json"):
        check_json(path)
    elif name.endswith(TORCH_SUFFIXES) or name in TORCH_NAMES:
        check_torch_archive(path)


def verify_checkpoint_files(root: Path) -> None:
    """Check every file under ``root``; raises :class:`CheckpointDamaged` for the first damaged one."""
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            check_file(Path(dirpath) / name)
