"""Write prepared parts, streaming: arrow (the ``datasets.save_to_disk`` layout) and the jsonl mirror.

A part is written in batches of about :data:`WRITE_BATCH_TOKENS` tokens, each gathered from the on-disk token
cache, so writing a part of any size needs a bounded amount of memory.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import DatasetInfo, Features, List, Value
from datasets.arrow_writer import ArrowWriter

from colossal_llama.dataset.packing import Plan
from colossal_llama.dataset.token_cache import TokenCache
from colossal_llama.utils.labels import IGNORE_INDEX

# Tokens per record batch (about 12 MB of arrow: three int32 columns). Every record batch costs each training rank
# that opens the part a header read and a few KiB of Arrow objects for as long as it trains, so fewer is better
# (100 B tokens: 95 k batches instead of the 381 k of 1 << 18); the writer holds about one batch's arrays, some
# of them int64, at a time. Measured (benchmarks/prepare_scale.py, 16x corpus, peak RSS of the preparation):
# 1 << 18: 549 MB, 1 << 20: 565 MB, 1 << 21: 618 MB, 1 << 22: 632 MB; 1 << 20 is the knee.
WRITE_BATCH_TOKENS = 1 << 20
DATA_FILE = "data-00000-of-00001.arrow"
PART_FEATURES = Features({
    "input_ids": List(Value("int32")),
    "labels": List(Value("int32")),
    "position_ids": List(Value("int32")),
    "category": Value("string"),
})


def part_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass
class WrittenPart:
    """What writing one part produced, counted from the rows actually written."""

    name: str
    bin: int
    num_sequences: int = 0
    num_tokens: int = 0
    trained_tokens: int = 0
    fully_masked_pieces: int = 0  # pieces (documents or chunks) without a single trained token
    per_category: dict[str, dict] = field(default_factory=dict)  # category -> {"sequences": n, "tokens": t}

    def add_rows(self, categories: list[str], tokens: np.ndarray) -> None:
        self.num_sequences += len(categories)
        self.num_tokens += int(tokens.sum())
        for cat, n in zip(categories, tokens.tolist()):
            entry = self.per_category.setdefault(cat, {"sequences": 0, "tokens": 0})
            entry["sequences"] += 1
            entry["tokens"] += n


def _batches(row_tokens: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """``[a, b)`` row ranges of about ``budget`` tokens each (at least one row)."""
    ends = np.cumsum(row_tokens)
    ranges, a = [], 0
    while a < len(row_tokens):
        base = ends[a - 1] if a else 0
        b = max(a + 1, int(np.searchsorted(ends, base + budget, side="right")))
        ranges.append((a, b))
        a = b
    return ranges


def _list_array(offsets: pa.Array, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))


def _write_saved_dataset_files(part_dir: Path, fingerprint: str) -> None:
    """``state.json`` and ``dataset_info.json`` as ``Dataset.save_to_disk`` writes them, for one data file."""
    state = {"_data_files": [{"filename": DATA_FILE}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (part_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(DatasetInfo(features=PART_FEATURES))
    (part_dir / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2),
                                                encoding="utf-8")


class PartWriter:
    """Writes the parts of a :class:`~colossal_llama.dataset.packing.Plan` from a :class:`TokenCache`."""

    def __init__(self, cache: TokenCache, tokenizer, max_length: int, mirror_text: bool = False, progress=None):
        self.cache, self.tokenizer, self.max_length, self.progress = cache, tokenizer, max_length, progress
        self.mirror_text = mirror_text
        self.categories = np.array(cache.docs.categories, dtype=object)
        self.file_prefix = [_json_string(str(f))[:-1] for f in cache.docs.files]  # '"name' (escaped, unclosed)

    def write(self, plan: Plan, index: int, rows: np.ndarray, arrow_dir: Path, jsonl_path: Path) -> WrittenPart:
        """Part ``index``: ``rows`` (sequence numbers of ``plan``) to ``arrow_dir/part-XXXXX`` and ``jsonl_path``."""
        written = WrittenPart(part_name(index), index)
        part_dir = arrow_dir / written.name
        part_dir.mkdir(parents=True)
        digest = hashlib.sha256()
        row_tokens = plan.sequences.tokens[rows]
        writer = ArrowWriter(features=PART_FEATURES, path=str(part_dir / DATA_FILE))
        with open(jsonl_path, "w", encoding="utf-8") as mirror:
            for a, b in _batches(row_tokens, WRITE_BATCH_TOKENS):
                table = self._batch(plan, rows[a:b], row_tokens[a:b], written, mirror)
                for name in ("input_ids", "labels", "position_ids"):
                    column = table.column(name).chunk(0)
                    digest.update(column.offsets.to_numpy().tobytes())
                    digest.update(column.values.to_numpy().tobytes())
                digest.update("\n".join(table.column("category").to_pylist()).encode("utf-8"))
                writer.write_table(table)
        writer.finalize()
        writer.close()
        _write_saved_dataset_files(part_dir, digest.hexdigest()[:16])
        return written

    def _batch(self, plan: Plan, rows: np.ndarray, row_tokens: np.ndarray, written: WrittenPart, mirror) -> pa.Table:
        seqs = plan.sequences
        pieces = seqs.piece_indices(rows)
        doc, start, length = seqs.doc[pieces], seqs.start[pieces], seqs.length[pieces]
        ids, labels = self.cache.gather(doc, start, length)
        piece_begin = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
        # A piece's first token is never predicted: the token before it in the row is another document's (the
        # block mask hides it) or the row starts there (the shifted loss skips position 0). Its label, left on,
        # would train the previous document's last token to predict an unrelated one (tokenizers without BOS)
        # and count a token as trained that no loss sees.
        labels[piece_begin[length > 0]] = IGNORE_INDEX
        position = (np.arange(len(ids), dtype=np.int64) - np.repeat(piece_begin, length)).astype(np.int32)
        trained = np.add.reduceat((labels != IGNORE_INDEX).astype(np.int64), piece_begin) if len(ids) else length
        written.trained_tokens += int(trained.sum())
        written.fully_masked_pieces += int(np.count_nonzero(trained == 0))
        categories = self.categories[plan.seq_category[rows]].tolist()
        written.add_rows(categories, row_tokens)
        row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(row_tokens, out=row_offsets[1:])
        self._mirror(mirror, categories, ids, row_offsets, seqs.offsets[rows + 1] - seqs.offsets[rows],
                     doc, start, length)
        if self.progress is not None:
            self.progress.update(len(ids))
        offsets = pa.array(row_offsets.astype(np.int32))
        return pa.table({
            "input_ids": _list_array(offsets, ids), "labels": _list_array(offsets, labels),
            "position_ids": _list_array(offsets, position), "category": pa.array(categories, type=pa.string()),
        })

    def _mirror(self, fh, categories, ids, row_offsets, pieces_per_row, doc, start, length) -> None:
        """Readable mirror: per sequence its category, the provenance of each piece (``file:line``, chunk, first
        token, tokens) and, with ``mirror_text``, the decoded text (decoding costs about as much as tokenising).

        Lines are formatted directly (the same text as ``json.dumps(row, ensure_ascii=False)``), strings escaped
        once per file and category: the mirror holds a JSON object per piece, and a dict + ``json.dumps`` each
        cost more than gathering the piece's tokens."""
        bounds = row_offsets.tolist()
        texts = [None] * len(categories)
        if self.mirror_text:
            texts = self.tokenizer.backend_tokenizer.decode_batch(
                [ids[bounds[i]: bounds[i + 1]].tolist() for i in range(len(categories))], skip_special_tokens=False)
        docs = self.cache.docs
        pieces = [f'{{"doc": {self.file_prefix[f]}:{line}", "chunk": {c}, "start": {s}, "tokens": {n}}}'
                  for f, line, c, s, n in zip(docs.file[doc].tolist(), docs.line[doc].tolist(),
                                              (start // self.max_length).tolist(), start.tolist(), length.tolist())]
        ends = np.cumsum(pieces_per_row).tolist()
        lines = []
        for category, text, a, b, p_end, n_pieces in zip(categories, texts, bounds, bounds[1:], ends,
                                                         pieces_per_row.tolist()):
            row = (f'{{"category": {_json_string(category)}, "num_tokens": {b - a}, '
                   f'"pieces": [{", ".join(pieces[p_end - n_pieces: p_end])}]')
            lines.append(row + ("}" if text is None else f', "text": {_json_string(text)}}}'))
        fh.write("\n".join(lines) + "\n")


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
