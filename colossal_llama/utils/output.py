"""Output folders: refuse to clobber one unless asked, so a typo never deletes a trained model."""
from __future__ import annotations

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
