"""Small JSON files (configs, manifests, reports): one reader with a one-line error, one pretty writer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from colossal_llama.utils.durable import replace_file
from colossal_llama.utils.errors import UserInputError


def read_json(path: Path, missing_ok: bool = False) -> Optional[Any]:
    """Parsed ``path``; ``None`` when it is absent and ``missing_ok``; a one-line error when it is not JSON."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError as err:
        raise UserInputError(f"{path}: not valid UTF-8 ({err.reason})") from None


def write_json(path: Path, value: Any, sort_keys: bool = False) -> None:
    """``value`` as indented UTF-8 JSON (non-ASCII kept readable) with a trailing newline.

    Atomic (tmp file + rename): a reader never sees half a file, and a file whose presence means "complete"
    (a manifest, a checkpoint's running states) only appears whole; durable (fsynced, then its folder): so it
    stays whole when the machine loses power.
    """
    replace_file(path, json.dumps(value, ensure_ascii=False, indent=2, sort_keys=sort_keys) + "\n")
