"""pytest fixtures for the training tests: one tiny model and one small real prepared dataset per session.

Registered for every test module by ``pytest_plugins`` in ``tests/conftest.py``.
Both are built once under the session's base temp dir and reused by every module that uses them.
"""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from tests.support.prepared_data import prepare_small_pretrain
from tests.support.tiny_model import make_tiny_llama
from tests.support.train_runs import ReferenceRuns


def _once(root: Path, name: str, build) -> Path:
    out = root / name
    root.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".done").is_file():
            build(out)
            (out / ".done").write_text("ok")
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_dir) -> Path:
    """Tiny LLaMA (hidden 64, 2 layers, 4 heads / 2 KV heads, tied embeddings) with the real SmolLM2 tokenizer."""
    root = tmp_path_factory.getbasetemp() / "train-shared"
    return _once(root, "tiny-llama", lambda out: make_tiny_llama(smollm2_dir, out / "model")) / "model"


@pytest.fixture(scope="session")
def prepared_pretrain(tmp_path_factory, smollm2_dir, data_dir) -> Path:
    """Real pre-training rows (novel + reviews) prepared with the SmolLM2 tokenizer: max_length 128, 2 bins."""
    root = tmp_path_factory.getbasetemp() / "train-shared"
    return _once(root, "prepared", lambda out: prepare_small_pretrain(data_dir, smollm2_dir, out / "data")) / "data"


@pytest.fixture(scope="session")
def prepared_with_heldout(tmp_path_factory, smollm2_dir, data_dir) -> Path:
    """The same real rows with 10 % of each category's documents held out (``eval/``) for validation."""
    root = tmp_path_factory.getbasetemp() / "train-shared"
    return _once(root, "prepared-heldout", lambda out: prepare_small_pretrain(data_dir, smollm2_dir, out / "data",
                                                                              holdout_fraction=0.1)) / "data"


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory, tiny_llama, prepared_pretrain) -> ReferenceRuns:
    """Uninterrupted 2-rank training runs by layout name (``tests.support.train_runs.LAYOUTS``), made on first use."""
    return ReferenceRuns(tmp_path_factory.getbasetemp() / "train-runs", tiny_llama, prepared_pretrain)
