"""One way to load a tokenizer everywhere (data preparation, training, inference), so all agree."""
from __future__ import annotations

from pathlib import Path

from colossal_llama.utils.errors import UserInputError


def load_tokenizer(path):
    """Load the tokenizer in folder ``path``.

    A HF folder (``tokenizer_config.json`` / ``tokenizer.json``) loads with ``AutoTokenizer``. A bare LLaMA-2
    style folder holding only ``tokenizer.model`` (as SentencePiece models are often shipped) loads as
    ``LlamaTokenizerFast`` with the LLaMA special tokens; ``LlamaTokenizer(vocab_file=...)`` is avoided on
    purpose: recent transformers can silently build a tiny tokenizer from it.
    """
    from transformers import AutoTokenizer, LlamaTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: tokenizer directory does not exist")
    has_hf_files = (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    try:
        if not has_hf_files and (path / "tokenizer.model").is_file():
            return LlamaTokenizerFast.from_pretrained(str(path), legacy=False)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserInputError(f"{path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
