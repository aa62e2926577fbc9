"""Output folders: refuse to clobber one unless asked, so a typo never deletes a trained model."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from colossal_llama.utils.errors import UserInputError


def clear_output_dir(path: Path, overwrite: bool) -> Path:
    """Make sure ``path`` does not exist: remove it with ``overwrite``, else a one-line error."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise UserInputError(f"{path}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(path)
    return path


def replace_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target`` (a sibling); an existing ``target`` is removed only once
    ``tmp`` is complete, so an interrupted run never leaves a half-written folder under the final name."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
    return target
