"""Write prepared parts: arrow (``datasets.save_to_disk``), the jsonl mirror, and the manifest (last).

Rows are assembled with numpy gathers from the flat token arrays of the tokenised dataset, so nothing is
copied through Python lists except for the human-readable mirror's decoded text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import datasets
from datasets import Dataset
from datasets.table import InMemoryTable

from colossal_llama.dataset.packing import Piece
from colossal_llama.utils.json_files import write_json


@dataclass
class TokenStore:
    """Flat view of the tokenised documents: document ``d`` is ``ids[offsets[d]:offsets[d + 1]]``."""

    ids: np.ndarray        # int32 [total_tokens]
    labels: np.ndarray     # int32 [total_tokens], -100 = no loss
    offsets: np.ndarray    # int64 [num_docs + 1]
    doc_ids: list[str]     # "file:line" of each document

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "TokenStore":
        table = ds.data.table
        ids = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        return cls(
            ids=ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
            labels=labels.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
            offsets=ids.offsets.to_numpy().astype(np.int64) - int(ids.offsets[0].as_py()),
            doc_ids=table.column("doc_id").to_pylist(),
        )

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_tokens(self, piece: Piece) -> int:
        start = self.offsets[piece.doc] + piece.start
        return int(np.count_nonzero(self.labels[start: start + piece.length] != -100))


@dataclass
class PartRows:
    """The rows of one part: ``rows[i] = (category, pieces)``, each row one packed sequence."""

    index: int
    rows: list[tuple[str, list[Piece]]]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def _gather(store: TokenStore, rows: list[tuple[str, list[Piece]]]):
    """Token index array, per-token position ids and row offsets for ``rows``."""
    pieces = [p for _, row in rows for p in row]
    starts = np.array([store.offsets[p.doc] + p.start for p in pieces], dtype=np.int64)
    lengths = np.array([p.length for p in pieces], dtype=np.int64)
    piece_offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(piece_offsets[-1])
    # position within its piece: global index minus the piece's first output index (repeated per token)
    position = np.arange(total, dtype=np.int64) - np.repeat(piece_offsets[:-1], lengths)
    index = np.repeat(starts, lengths) + position
    row_lengths = [sum(p.length for p in row) for _, row in rows]
    row_offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32)
    return index, position.astype(np.int32), row_offsets


def build_part_table(store: TokenStore, part: PartRows) -> pa.Table:
    """Arrow table with the contract's columns: input_ids, labels, position_ids (int32 lists), category."""
    index, position, row_offsets = _gather(store, part.rows)
    offsets = pa.array(row_offsets, type=pa.int32())

    def column(values: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    return pa.table({
        "input_ids": column(store.ids[index]),
        "labels": column(store.labels[index]),
        "position_ids": column(position),
        "category": pa.array([cat for cat, _ in part.rows], type=pa.string()),
    })


def write_arrow_part(table: pa.Table, path: Path) -> None:
    """``save_to_disk`` with a content-derived fingerprint, so identical data gives identical files."""
    digest = hashlib.sha256()
    for name in ("input_ids", "labels", "position_ids"):
        col = table.column(name).combine_chunks()
        digest.update(col.offsets.to_numpy().tobytes())
        digest.update(col.flatten().to_numpy().tobytes())
    digest.update("\n".join(table.column("category").to_pylist()).encode("utf-8"))
    dataset = Dataset(InMemoryTable(table), fingerprint=digest.hexdigest()[:16])
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per tiny part is noise under the outer "write" bar
    try:
        dataset.save_to_disk(str(path), num_shards=1)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def write_jsonl_part(store: TokenStore, part: PartRows, tokenizer, path: Path) -> None:
    """Human-readable mirror: per sequence its category, provenance of each piece and the decoded text."""
    index, _, row_offsets = _gather(store, part.rows)
    ids = store.ids[index]
    texts = tokenizer.batch_decode(
        [ids[row_offsets[i]: row_offsets[i + 1]].tolist() for i in range(len(part.rows))],
        skip_special_tokens=False,
    )
    with open(path, "w", encoding="utf-8") as fh:
        for (category, pieces), text in zip(part.rows, texts):
            row = {
                "category": category,
                "num_tokens": sum(p.length for p in pieces),
                "pieces": [{"doc": store.doc_ids[p.doc], "chunk": p.chunk, "start": p.start, "tokens": p.length}
                           for p in pieces],
                "text": text,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_manifest(manifest: dict, path: Path) -> None:
    """Write ``manifest.json`` atomically: its presence means the output is complete."""
    write_json(path, manifest, sort_keys=True)
