"""Shared fixtures: real data paths and the real SmolLM2-135M model converted once to a HF folder."""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/support and top-level scripts

from colossal_llama.utils.paths import data_root, mistral_tokenizer_model, smollm2_gguf  # noqa: E402

# Session fixtures of the training tests (tiny_llama, prepared_pretrain), shared by several modules.
pytest_plugins = ["tests.support.train_fixtures"]

CACHE = Path(os.environ.get("COLOSSAL_LLAMA_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real data (../shared/data or examples/data)."""
    return data_root()


@pytest.fixture(scope="session")
def mistral_sp_model() -> Path:
    """Path of the real Mistral ``tokenizer.model`` (SentencePiece, LLaMA-2 layout)."""
    path = mistral_tokenizer_model()
    if not path.is_file():
        pytest.fail(f"real Mistral tokenizer missing at {path}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF folder of the real SmolLM2-135M-Instruct (float32), exported from the GGUF once and cached."""
    gguf = smollm2_gguf()
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not present (it is ~100 MB and only in the development data)")
    from colossal_llama.model.gguf_export import export_gguf_to_hf

    out = CACHE / "smollm2-135m-instruct"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:  # pytest-xdist / parallel sessions export once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            export_gguf_to_hf(gguf, out)
    return out


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory, mistral_sp_model) -> Path:
    """HF tokenizer folder (LlamaTokenizerFast) converted from the real Mistral ``tokenizer.model``."""
    from colossal_llama.tokenizer.loading import sentencepiece_to_hf_dir

    return sentencepiece_to_hf_dir(mistral_sp_model, tmp_path_factory.mktemp("mistral"))
