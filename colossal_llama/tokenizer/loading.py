"""One way to load a tokenizer everywhere (data preparation, training, inference), so all agree."""
from __future__ import annotations

from pathlib import Path

from colossal_llama.utils.errors import UserInputError


def load_tokenizer(path):
    """``AutoTokenizer.from_pretrained(path)`` with a one-line error when ``path`` holds no tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: tokenizer directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
