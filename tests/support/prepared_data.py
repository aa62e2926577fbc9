"""A small prepared pre-training dataset from the REAL data, written by the project's own data preparation."""
from __future__ import annotations

import itertools
from pathlib import Path

PRETRAIN_SLICE = {"en_novel_botchan.jsonl": 120, "zh_reviews.jsonl": 300}  # real file -> its first N rows


def write_input_slice(data_root: Path, out_dir: Path) -> Path:
    """Copy the first rows of real pre-training files into ``out_dir`` (the preparation input)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in PRETRAIN_SLICE.items():
        with open(data_root / "pretrain" / name, encoding="utf-8") as fh, \
                open(out_dir / name, "w", encoding="utf-8") as out:
            out.writelines(itertools.islice(fh, rows))
    return out_dir


def prepare_small_pretrain(data_root: Path, tokenizer_dir: Path, out_dir: Path, max_length: int = 128,
                           num_bins: int = 2, seed: int = 7) -> Path:
    """``out_dir`` (manifest.json, arrow/part-*) prepared by ``prepare_pretrain`` from a slice of the real data."""
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.prepare import prepare_pretrain

    inputs = write_input_slice(data_root, Path(str(out_dir) + "-input"))
    cfg = PretrainPrepConfig(input_dirs=[inputs], tokenizer_dir=Path(tokenizer_dir),
                             output=OutputLayout.under(out_dir), max_length=max_length, num_bins=num_bins,
                             seed=seed, overwrite=True)
    prepare_pretrain(cfg)
    return Path(out_dir)
