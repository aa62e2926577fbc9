"""Make a Hugging Face tokenizer folder from a bare SentencePiece ``tokenizer.model``.

Data preparation loads tokenizers from folders (``load_tokenizer``); a LLaMA-layout SentencePiece model
(e.g. Mistral's) is turned into one by converting it to ``LlamaTokenizerFast`` once and saving it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from colossal_llama.utils.errors import UserInputError


def sentencepiece_to_hf_dir(model_file, out_dir) -> Path:
    """Write ``tokenizer.model`` + ``tokenizer.json`` + configs of a ``LlamaTokenizerFast`` into ``out_dir``."""
    from transformers import LlamaTokenizerFast

    model_file, out_dir = Path(model_file), Path(out_dir)
    if not model_file.is_file():
        raise UserInputError(f"{model_file}: SentencePiece model does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    # from_pretrained on a folder (not LlamaTokenizer(vocab_file=...), which can build a tiny vocabulary)
    LlamaTokenizerFast.from_pretrained(str(out_dir), legacy=True).save_pretrained(str(out_dir))
    return out_dir
