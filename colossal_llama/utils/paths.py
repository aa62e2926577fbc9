"""Where the bundled real data lives: ``../shared/data`` in the development checkout, else ``examples/data``."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """``$COLOSSAL_LLAMA_DATA`` if set, else ``../shared/data`` beside the repo, else ``examples/data``."""
    env = os.environ.get("COLOSSAL_LLAMA_DATA")
    if env:
        return Path(env)
    shared = REPO_ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else REPO_ROOT / "examples" / "data"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (may not exist in a user's clone: it is ~100 MB)."""
    return data_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def mistral_tokenizer_model() -> Path:
    """The real Mistral-7B SentencePiece model (LLaMA layout, 32,000 pieces)."""
    return data_root() / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model"
