"""One way to load a tokenizer everywhere (data preparation, training, inference), so all agree."""
from __future__ import annotations

from pathlib import Path

from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.json_files import read_json

JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


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
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises bare Exception on a damaged file
        for name in JSON_FILES:  # a cut-off file: name it (read_json raises a one-line error)
            read_json(path / name, missing_ok=True)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        named = path
        if not isinstance(err, (OSError, ValueError)) and (path / "tokenizer.json").is_file():
            named = path / "tokenizer.json"  # valid JSON that the tokenizers library rejects (an unknown model type)
        raise UserInputError(f"{named}: cannot load a tokenizer ({first_line})") from None


def plain_backend(tokenizer):
    """The fast tokenizer's Rust backend with truncation and padding off, or None for a slow tokenizer.

    A ``tokenizer.json`` may store a truncation or padding setting, which transformers leaves on in the backend
    (its own calls set them per call): encoding through the backend directly would cut or pad every text. Turning
    them off changes nothing for transformers' calls, which set both each time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
    return backend


def text_backend(tokenizer):
    """A copy of the fast tokenizer's Rust backend (:func:`plain_backend`) that reads special tokens spelled in a
    text as text (``encode_special_tokens``), or None for a slow tokenizer. Cached on the tokenizer.

    What data and prompts say is text: only the pipeline puts control tokens (BOS, EOS, a template's markers) in.
    Web text holds ``<s>...</s>`` (HTML's strikethrough), ``<|endoftext|>`` and the like: read as the tokenizer's
    own special tokens they put BOS/EOS in the middle of documents. A copy, because transformers sets the flag on
    its own backend at every call (``split_special_tokens``)."""
    cached = getattr(tokenizer, "_colossal_llama_text_backend", None)
    if cached is not None:
        cached.encode_special_tokens = True  # a pickled Tokenizer (a datasets.map worker's) comes back without it
        return cached
    backend = plain_backend(tokenizer)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    tokenizer._colossal_llama_text_backend = copy
    return copy


def markup_backend(tokenizer):
    """The fast tokenizer's backend (:func:`plain_backend`) reading special tokens in the text as such: for text a
    template rendered (its markers are special tokens), never for data. None for a slow tokenizer."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        backend.encode_special_tokens = False  # transformers may have left it on (split_special_tokens=True)
    return backend


def sentencepiece_to_hf_dir(model_file, out_dir) -> Path:
    """Make ``out_dir`` a HF tokenizer folder (``tokenizer.model`` + ``tokenizer.json`` + configs) from a bare
    SentencePiece model, converted once with :func:`load_tokenizer`'s rules; returns ``out_dir``."""
    import shutil

    model_file, out_dir = Path(model_file), Path(out_dir)
    if not model_file.is_file():
        raise UserInputError(f"{model_file}: SentencePiece model does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    load_tokenizer(out_dir).save_pretrained(str(out_dir))
    return out_dir
