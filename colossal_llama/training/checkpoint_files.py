"""Cheap integrity checks of the files of a checkpoint (or a ``modeling/`` folder) before loading them.

A file cut short (full disk, interrupted copy) otherwise surfaces as a library traceback that names no file.
Checks read only what is needed to detect truncation: safetensors headers against the file size, the end-of-
archive record of ``torch.save`` zip files, and JSON parsing of the small files.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from colossal_llama.model.safetensors_stream import check_safetensors_file
from colossal_llama.utils.errors import UserInputError, damaged_file

# Files written by torch.save (zip archives): optimizer states, the scheduler, per-rank RNG, .bin weights.
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TORCH_NAMES = ("lr_scheduler",)


def check_torch_archive(path: Path) -> None:
    """A ``torch.save`` file: a zip whose central directory is intact and inside the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            end = max((info.header_offset + info.compress_size for info in archive.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise damaged_file(path, "torch.save", str(err)) from None
    if end > os.path.getsize(path):
        raise damaged_file(path, "torch.save", "data past the end of the file")


def check_json(path: Path) -> None:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise damaged_file(path, "JSON", str(err)) from None


def check_index(path: Path) -> None:
    """A shard index (``*.index.json``: HF weights, colossalai's optimizer states): every file it names is there
    (a copy that left one out loaded without it, or failed deep in colossalai)."""
    if path.name == "pytorch_model.bin.index.json" and (path.parent / "model.safetensors.index.json").is_file():
        return  # a HF folder downloaded without its .bin copies: the safetensors index is the one read
    index = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(index, dict):
        return
    named = set((index.get("weight_map") or {}).values())
    groups = (index.get("metadata") or {}).get("param_groups")
    named |= {groups} if isinstance(groups, str) else set()
    for name in sorted(n for n in named if isinstance(n, str)):
        if not (path.parent / name).is_file():
            raise UserInputError(f"{path.parent / name}: missing, though {path.name} names it (an incomplete copy?)")


def check_file(path: Path) -> None:
    """Dispatch on the file name; files of other kinds (tokenizer models, text) are not checked."""
    name = path.name
    if name.endswith(".safetensors"):
        check_safetensors_file(path)
    elif name.endswith(".index.json"):
        check_json(path)
        check_index(path)
    elif name.endswith(".json"):
        check_json(path)
    elif name.endswith(TORCH_SUFFIXES) or name in TORCH_NAMES:
        check_torch_archive(path)


def verify_checkpoint_files(root: Path) -> None:
    """Check every file under ``root``; a one-line :class:`UserInputError` names the first damaged one."""
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            check_file(Path(dirpath) / name)
