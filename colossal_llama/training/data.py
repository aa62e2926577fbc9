"""Prepared data for training: manifest checks, buckets, and a resumable distributed sampler.

The data contract: ``--dataset`` names prepared outputs ``OUT`` (or ``OUT/arrow``, ``OUT/arrow/part-XXXXX``, the
shard folders ``OUT/shard-IIIII-of-NNNNN`` of a run split over nodes, or ``OUT`` holding them all); each part is
one bin (bucket) and its manifest is ``OUT/manifest.json``. Bucket k is the union of part k of every output and
shard named, once all their manifests agree (kind, tokenizer, max_length, bins). Training walks bucket 0, then
1, ... (shuffled within, seeded per epoch), or one global shuffle with ``--shuffle_buckets``.
The held-out split (``--holdout_fraction`` at preparation) is read the same way with ``split="eval"``.

Sampling is a pure function of (seed, epoch, sample offset), so the data position of a resumed run is just two
integers and the next sample after a resume is exactly the one the interrupted run would have used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from colossal_llama.dataset.chat_templates import JINJA_SHA256, chat_template_sha256
from colossal_llama.dataset.manifest import Manifest
from colossal_llama.dataset.prepared import load_part, manifest_path_of, read_manifest, resolve_parts, split_of
from colossal_llama.training.mixture import Mixture, row_index_dtype, split_dataset_weight
from colossal_llama.utils.errors import UserInputError
from colossal_llama.utils.fingerprint import tokenizer_fingerprint
from colossal_llama.utils.groups import grouped_rows

log = logging.getLogger(__name__)
COLUMNS = ("input_ids", "labels", "position_ids")
DEFAULT_CATEGORY = "default"  # rows of a part without a category column
MAX_CATEGORIES = int(np.iinfo(np.int16).max)  # category codes are int16 per row (2 bytes a sequence)


@dataclass
class PreparedPart:
    path: Path
    bin: int
    num_sequences: int
    manifest_path: Path
    source: int = 0  # index of the --dataset entry that named it


@dataclass
class PreparedData:
    """Concatenated parts, ordered by bucket. ``bucket_sizes[k]`` rows of bucket k follow bucket k-1's.

    ``row_category[i]`` indexes ``categories`` and ``row_source[i]`` the ``--dataset`` entries (int16 per row:
    what mixtures and per-category accounting need, at 4 bytes a sequence)."""

    dataset: object  # datasets.Dataset with input_ids / labels / position_ids
    bucket_sizes: List[int]
    manifest: Manifest  # manifest of the first part (all agree on kind, tokenizer, max_length, bins, template)
    chat_template: dict | None
    categories: List[str] = field(default_factory=list)  # sorted
    row_category: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    row_source: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int16))

    def bucket_groups(self) -> List[List[tuple]]:
        """Per bucket, ``((source, category), row indices)`` of every group present (for :mod:`mixture`)."""
        groups, start, dtype = [], 0, row_index_dtype(sum(self.bucket_sizes))
        for size in self.bucket_sizes:
            keys = self.row_source[start:start + size].astype(np.int64) * 65536 + self.row_category[start:start + size]
            bucket = []
            # one stable sort, not a pass over the bucket per group (4,000 categories took 4 s on 2 M rows)
            for key, rows in zip(*grouped_rows(keys, start, dtype)):
                source, category = divmod(int(key), 65536)
                bucket.append(((source, self.categories[category]), rows))
            groups.append(bucket)
            start += size
        return groups


class RowsWithCategory:
    """The training rows, each with its ``category_code`` (index into ``PreparedData.categories``)."""

    def __init__(self, data: PreparedData):
        self.dataset, self.codes = data.dataset, data.row_category

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "category_code": self.codes[index]}


def expand_dataset_args(paths: Sequence[str], split: str = "train") -> List[Path]:
    """``--dataset`` values -> part dirs (see :mod:`colossal_llama.dataset.prepared`). Bad paths are user errors;
    a part named twice (``OUT`` and ``OUT/arrow``) is refused."""
    return [part for part, _ in _parts_with_sources(paths, split)]


def _parts_with_sources(paths: Sequence[str], split: str) -> List[tuple[Path, int]]:
    """(part dir, index of the --dataset value naming it); a ``:WEIGHT`` suffix is not part of the path."""
    parts: List[tuple[Path, int]] = []
    for source, raw in enumerate(paths):
        try:
            parts.extend((part, source) for part in resolve_parts(split_dataset_weight(raw)[0], split))
        except UserInputError as err:
            raise UserInputError(f"--dataset {err}") from None
    seen = set()
    for part, _ in parts:
        if part.resolve() in seen:
            raise UserInputError(f"--dataset {part}: named twice")
        seen.add(part.resolve())
    return parts


def check_manifest_against_model(manifest: Manifest, manifest_path: Path, tokenizer, model_vocab_rows: int,
                                 max_length: int, pretrained: str) -> None:
    """Refuse data prepared with another tokenizer, a bigger vocabulary, or longer sequences. One-line errors."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if manifest.tokenizer_fingerprint != fingerprint:
        raise UserInputError(
            f"{manifest_path}: tokenizer_fingerprint: data was prepared with tokenizer {manifest.tokenizer_dir!r} "
            f"which differs from the tokenizer in --pretrained {pretrained}"
        )
    _check_chat_template(manifest, manifest_path, tokenizer, pretrained)
    if manifest.vocab_size > model_vocab_rows:
        raise UserInputError(
            f"{manifest_path}: vocab_size: {manifest.vocab_size} exceeds the model's {model_vocab_rows} embedding rows "
            f"(--pretrained {pretrained}; run init_model.py to expand the embeddings)"
        )
    if manifest.max_length > max_length:
        raise UserInputError(
            f"{manifest_path}: max_length: data sequences go up to {manifest.max_length} tokens "
            f"but --max_length is {max_length}"
        )


def _check_chat_template(manifest: Manifest, manifest_path: Path, tokenizer, pretrained: str) -> None:
    """Data rendered with one tokenizer's own chat template trains a model that inference prompts with its own
    tokenizer's: another template (same vocabulary, so the fingerprint agrees) is refused. Manifests written before
    the template's hash was recorded are not checked."""
    recorded = (manifest.chat_template or {}).get(JINJA_SHA256)
    if recorded is None:
        return
    own = chat_template_sha256(tokenizer)
    if own != recorded:
        theirs = "no chat template" if own is None else f"another one (sha256 {own[:12]})"
        raise UserInputError(
            f"{manifest_path}: chat_template: data was rendered with the chat template of tokenizer "
            f"{manifest.tokenizer_dir!r} (sha256 {recorded[:12]}), and the tokenizer in --pretrained {pretrained} has "
            f"{theirs}; prepare the data with --tokenizer_dir {pretrained}"
        )


def _check_agreement(manifests: Dict[Path, Manifest]) -> None:
    """Every manifest agrees with the first on kind, tokenizer, max_length, bins and chat template."""
    (first_path, first), *rest = manifests.items()
    for path, manifest in rest:
        name = first.disagreement(manifest)
        if name == "kind":
            raise UserInputError(f"--dataset mixes {sorted({first.kind, manifest.kind})} data ({first_path}, "
                                 f"{path}); train pre-training and SFT in separate stages")
        if name == "chat_template":
            raise UserInputError(f"--dataset: {path} and {first_path} were prepared with different chat templates")
        if name is not None:
            mine, theirs = getattr(manifest, name), getattr(first, name)
            raise UserInputError(f"{path}: {name}: {mine} differs from {theirs} in {first_path} (every --dataset "
                                 f"output and shard must be prepared with the same tokenizer, max_length and bins)")


def collect_parts(part_dirs: Sequence[Path], sources: Sequence[int] = ()) -> tuple[List[PreparedPart],
                                                                                    Dict[Path, Manifest]]:
    """Look every part up in its manifest (``part.parent.parent / manifest.json``); all manifests must agree.
    ``sources[i]``: the --dataset entry part i came from (default 0)."""
    manifests: Dict[Path, Manifest] = {}
    parts: List[PreparedPart] = []
    for i, part_dir in enumerate(part_dirs):
        manifest_path = manifest_path_of(part_dir)
        if manifest_path not in manifests:
            manifests[manifest_path] = read_manifest(manifest_path)
        manifest = manifests[manifest_path]
        entries = manifest.split_parts(split_of(part_dir, manifest))
        entry = next((e for e in entries if e.name == part_dir.name), None)
        if entry is None:
            raise UserInputError(f"{manifest_path}: parts: no entry named {part_dir.name!r} (--dataset {part_dir})")
        parts.append(PreparedPart(part_dir, entry.bin, entry.num_sequences, manifest_path,
                                  sources[i] if sources else 0))
    if manifests:
        _check_agreement(manifests)
    return parts, manifests


def load_prepared(parts: List[PreparedPart], manifests: Dict[Path, Manifest]) -> PreparedData:
    """Load the arrow parts (memory-mapped) and concatenate them bucket by bucket: bucket k is part k of every
    output and shard, in ``--dataset`` order."""
    from datasets import concatenate_datasets

    ordered = sorted(parts, key=lambda p: p.bin)  # sorted() is stable: --dataset order kept within a bin
    datasets, bucket_sizes, current_bin = [], [], None
    categories, sources = [], []  # per part: its rows' category names, its source
    for part in ordered:
        ds = load_part(part.path)
        if len(ds) != part.num_sequences:
            raise UserInputError(
                f"{part.manifest_path}: parts: {part.path.name} has {len(ds)} rows, manifest says {part.num_sequences}"
            )
        for column in COLUMNS:
            if column not in ds.column_names:
                raise UserInputError(f"{part.path}: column {column!r} missing (columns: {ds.column_names})")
        if len(ds) == 0:
            continue
        datasets.append(ds.select_columns(list(COLUMNS)))
        categories.append(ds.data.table.column("category").combine_chunks().dictionary_encode()
                          if "category" in ds.column_names else None)
        sources.append((part.source, len(ds)))
        if part.bin != current_bin:
            bucket_sizes.append(0)
            current_bin = part.bin
        bucket_sizes[-1] += len(ds)
    if not datasets:
        raise UserInputError(f"--dataset: the parts hold no sequences ({', '.join(str(p.path) for p in parts)})")
    first = manifests[parts[0].manifest_path]
    names, row_category = _category_codes(categories, [n for _, n in sources])
    row_source = np.concatenate([np.full(n, s, dtype=np.int16) for s, n in sources])
    return PreparedData(concatenate_datasets(datasets).with_format("numpy"), bucket_sizes, first, first.chat_template,
                        names, row_category, row_source)


def _category_codes(encoded: list, sizes: List[int]) -> tuple[List[str], np.ndarray]:
    """Per-part dictionary-encoded category columns -> (sorted names, int16 code per row of the concatenation)."""
    names = sorted({str(v) for col in encoded if col is not None for v in col.dictionary.to_pylist()}
                   | ({DEFAULT_CATEGORY} if any(col is None for col in encoded) else set()))
    if len(names) > MAX_CATEGORIES:
        raise UserInputError(f"--dataset: the data has {len(names):,} categories, at most {MAX_CATEGORIES:,} train "
                             "(a category is a share of the data weighed, counted and validated on its own: a "
                             "domain or a language, not each document's source)")
    index = {name: k for k, name in enumerate(names)}
    codes = []
    for col, n in zip(encoded, sizes):
        if col is None:
            codes.append(np.full(n, index[DEFAULT_CATEGORY], dtype=np.int16))
            continue
        remap = np.array([index[str(v)] for v in col.dictionary.to_pylist()], dtype=np.int16)
        codes.append(remap[col.indices.to_numpy(zero_copy_only=False)])
    return names, np.concatenate(codes) if codes else np.zeros(0, dtype=np.int16)


def load_training_data(dataset_args: Sequence[str], tokenizer, model_vocab_rows: int, max_length: int,
                       pretrained: str, split: str = "train") -> PreparedData:
    """Everything training needs from ``--dataset``, in one call: resolve the parts (outputs, shards, parts),
    check that all manifests agree and fit the model (before any model is built), load the buckets.

    ``split="eval"`` loads the held-out split written by ``--holdout_fraction`` instead (one bucket per output's
    eval part; a one-line error if an output has none).
    """
    named = _parts_with_sources(dataset_args, split)
    parts, manifests = collect_parts([p for p, _ in named], [s for _, s in named])
    for manifest_path, manifest in manifests.items():
        check_manifest_against_model(manifest, manifest_path, tokenizer, model_vocab_rows, max_length, pretrained)
    return load_prepared(parts, manifests)


def epoch_order(bucket_sizes: Sequence[int], seed: int, epoch: int, shuffle_buckets: bool) -> np.ndarray:
    """Indices of one epoch: bucket 0 shuffled, then bucket 1 shuffled, ... or one global shuffle.

    Pure function of its arguments (the reason resume is exact); different epochs give different orders. Built in
    place as 4-byte indices (8 with 2**32 sequences or more), each bucket's ``arange`` shuffled where it lies: the
    same order as ``start + rng.permutation(size)`` per bucket (numpy's permutation is that shuffle), without its
    int64 arrays and their concatenation (24 M sequences, 100 B tokens of 4,096: 96 MB a rank instead of 384 MB
    at the peak).
    """
    total = int(sum(bucket_sizes))
    order = np.arange(total, dtype=row_index_dtype(total))
    rng = np.random.default_rng([seed, epoch])
    if shuffle_buckets:
        rng.shuffle(order)
        return order
    start = 0
    for size in bucket_sizes:
        rng.shuffle(order[start:start + size])
        start += size
    return order


@dataclass
class StepBatchSampler:
    """Yields this rank's micro-batches (lists of row indices) from a sample offset to the end of the epoch.

    Step s of an epoch consumes the global slice ``order[s*G:(s+1)*G]`` with ``G = micro * accum * dp``. Within
    it, micro-batch m of dp-rank r is ``[(m*dp + r)*micro, +micro)``. The tail of an epoch that does not fill a
    global batch is skipped (counted in :attr:`dropped_per_epoch` and logged).
    """

    bucket_sizes: Sequence[int]
    micro_batch: int
    accumulation_steps: int
    dp_rank: int
    dp_size: int
    seed: int
    shuffle_buckets: bool
    epoch: int = 0
    start_offset: int = 0  # samples of this epoch already consumed (any number: a resume may change the global batch)
    mixture: Optional[Mixture] = None  # weighted draws (--dataset DIR:W, --category_weights), same bucket sizes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation_steps * self.dp_size

    @property
    def epoch_samples(self) -> int:
        return int(sum(self.bucket_sizes))

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_samples // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return self.epoch_samples - self.steps_per_epoch * self.global_batch

    def __iter__(self) -> Iterator[List[int]]:
        order = (self.mixture.epoch_order(self.seed, self.epoch, self.shuffle_buckets) if self.mixture is not None
                 else epoch_order(self.bucket_sizes, self.seed, self.epoch, self.shuffle_buckets))
        g, b = self.global_batch, self.micro_batch
        # full global batches only; from an offset that is no multiple of g (resumed with another global batch)
        for step_start in range(self.start_offset, self.epoch_samples - g + 1, g):
            for m in range(self.accumulation_steps):
                first = step_start + (m * self.dp_size + self.dp_rank) * b
                yield order[first:first + b].tolist()

    def __len__(self) -> int:
        remaining_steps = (self.epoch_samples - self.start_offset) // self.global_batch
        return max(0, remaining_steps) * self.accumulation_steps


def ends_epoch(sample_offset: int, global_batch: int, epoch_samples: int) -> bool:
    """Whether no full global batch is left in an epoch of ``epoch_samples`` after ``sample_offset``."""
    return sample_offset + global_batch > epoch_samples
