"""Prepared data for tests from the REAL data, written by the project's own data preparation, and read back."""
from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

PRETRAIN_SLICE = {"en_novel_botchan.jsonl": 120, "zh_reviews.jsonl": 300}  # real file -> its first N rows


def write_input_slice(data_root: Path, out_dir: Path, rows: dict | None = None) -> Path:
    """Copy the first rows of real pre-training files (``rows``: file -> N) into ``out_dir`` (the input)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (rows or PRETRAIN_SLICE).items():
        with open(data_root / "pretrain" / name, encoding="utf-8") as fh, \
                open(out_dir / name, "w", encoding="utf-8") as out:
            out.writelines(itertools.islice(fh, n))
    return out_dir


def prepare_small_pretrain(data_root: Path, tokenizer_dir: Path, out_dir: Path, max_length: int = 128,
                           num_bins: int = 2, seed: int = 7, holdout_fraction: float = 0.0) -> Path:
    """``out_dir`` (manifest.json, arrow/part-*, and eval/ with a ``holdout_fraction``) prepared by
    ``prepare_pretrain`` from a slice of the real data."""
    from colossal_llama.dataset.config import OutputLayout, PretrainPrepConfig
    from colossal_llama.dataset.pipeline import prepare_pretrain

    inputs = write_input_slice(data_root, Path(str(out_dir) + "-input"))
    cfg = PretrainPrepConfig(input_dirs=[inputs], tokenizer_dir=Path(tokenizer_dir),
                             output=OutputLayout.under(out_dir), max_length=max_length, num_bins=num_bins,
                             seed=seed, overwrite=True, holdout_fraction=holdout_fraction)
    prepare_pretrain(cfg)
    return Path(out_dir)


def reassemble(out: Path, split: str = "train") -> tuple[dict, dict]:
    """Per document of the prepared output ``out``: its (input_ids, labels) concatenated from the pieces found in
    the output, in output order, and the chunk numbers in the order they were met. Pieces are located by
    position_ids restarts; the jsonl mirror names the document each piece comes from.

    ``split="eval"``: the held-out parts (``out/eval``, mirrored as ``out/jsonl/eval-part-*.jsonl``).
    """
    from colossal_llama.dataset.prepared import document_spans, load_part, part_dirs

    folder, prefix = (out / "eval", "eval-") if split == "eval" else (out / "arrow", "")
    docs, chunk_order = defaultdict(lambda: ([], [])), defaultdict(list)
    for part in part_dirs(folder):
        ds = load_part(part)
        mirror = [json.loads(line) for line in (out / "jsonl" / f"{prefix}{part.name}.jsonl").read_text().splitlines()]
        assert len(mirror) == len(ds)
        for row, meta in zip(ds, mirror):
            spans = document_spans(row["position_ids"])
            assert len(spans) == len(meta["pieces"])
            for (start, end), piece in zip(spans, meta["pieces"]):
                assert row["position_ids"][start:end] == list(range(end - start))
                assert piece["tokens"] == end - start
                ids, labels = docs[piece["doc"]]
                ids += row["input_ids"][start:end]
                labels += row["labels"][start:end]
                chunk_order[piece["doc"]].append(piece["chunk"])
    return dict(docs), dict(chunk_order)
