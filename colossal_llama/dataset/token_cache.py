"""The tokenised documents on disk: streamed in, tokenised by ``datasets`` in ``num_proc`` workers, memory-mapped.

    row batches (streaming) -> raw blocks (Arrow, 1, 2, then 4 MiB of input each; up to 64 MiB with workers)
    -> Dataset.map(num_proc) -> token files (Arrow)

Only per-document metadata is held in memory (:class:`DocTable` and the token offsets: numpy arrays, ~56 bytes a
document; ~130-143 at the peak while packing is planned: benchmarks/plan_memory.py); token ids and labels stay in
the token files (Arrow, memory-mapped to read the metadata and locate the token buffers) until the parts are
written, which read each piece with a positional read, so the resident memory of a run does not grow with its
tokens. Each raw block is deleted once tokenised.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import mmap
import os
import queue
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import datasets
from datasets import Dataset
from datasets.arrow_writer import ArrowWriter

from colossal_llama.dataset.records import BATCH_LINES, RowBatch
from colossal_llama.dataset.tokenization import RAW_FEATURES, TOKENIZED_FEATURES
from colossal_llama.utils.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

FIRST_BLOCK_BYTES = 1 << 20     # the first block is small (tokenising starts early), each next one twice as big...
RAW_BLOCK_BYTES = 4 << 20       # ...up to this, one process (bounds the raw pages mapped at a time)
POOLED_BLOCK_BYTES = 64 << 20   # input per block with num_proc workers (each map call starts a pool, ~0.6 s)
MAP_BATCH_ROWS = BATCH_LINES    # rows per map batch
META_COLUMNS = ("category", "file", "line", "length", "full_length", "trained_from", "exchanges", "exchanges_kept")


@contextlib.contextmanager
def _tokenizer_threads(enabled: bool):
    """Workers get one tokenizer thread each (the Rust pool does not survive fork); restored afterwards."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    if not enabled:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


@dataclass
class DocTable:
    """Per-document metadata, aligned by document index (the token files' row order)."""

    category: np.ndarray        # int32, index into ``categories`` (sorted names)
    file: np.ndarray            # int32, index into ``files``
    line: np.ndarray            # int64, 1-based line in its file
    length: np.ndarray          # int32, tokens kept (SFT: 0 = dropped, even its first exchange is too long)
    full_length: np.ndarray     # int32, tokens before truncation
    trained_from: np.ndarray    # int32, pre-training: first trained token (after BOS + source); SFT: -1
    exchanges: np.ndarray       # int32 (SFT)
    exchanges_kept: np.ndarray  # int32 (SFT)
    categories: list[str]
    files: list[Path]

    def by_category(self, docs: np.ndarray) -> list[np.ndarray]:
        """``docs`` grouped by category (index = category), each group in document order."""
        docs = np.asarray(docs, dtype=np.int64)
        cats = self.category[docs]
        order = np.argsort(cats, kind="stable")
        bounds = np.searchsorted(cats[order], np.arange(len(self.categories) + 1))
        return [docs[order[bounds[c]: bounds[c + 1]]] for c in range(len(self.categories))]


class _TokenFile:
    """One token file. Its Arrow stream is memory-mapped once, to copy out the per-document columns and to find
    where each record batch's token buffers lie in the file; the tokens are then read with positional reads.

    Why not slice the mapping: pages of a file mapped into the process count as its resident memory, and a
    random gather faults in whole (large) folios around every piece, so the RSS of a run would grow to the size
    of its cache. Positional reads come from the same page cache and leave nothing resident.
    """

    def __init__(self, path: Path):
        self.path = path
        self.chunks: list[tuple[int, int, np.ndarray]] = []  # (ids position, labels position or -1, doc offsets)
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            self._index(mapped)

    def _index(self, mapped: mmap.mmap) -> None:
        buffer = pa.py_buffer(mapped)
        table = pa.ipc.open_stream(pa.BufferReader(buffer)).read_all()
        for ids, labels in zip(table.column("input_ids").chunks, table.column("labels").chunks):
            offsets = ids.offsets.to_numpy().astype(np.int64)
            self.chunks.append((self._position(ids, buffer), self._position(labels, buffer), offsets[:-1]))
        self.meta = {name: np.array(table.column(name).to_numpy(), copy=True) for name in META_COLUMNS + ("pid",)}

    def _position(self, array: pa.ListArray, mapped: pa.Buffer) -> int:
        """Byte position in the file of value 0 of ``array`` (an int32 list chunk read in place from it); -1 for
        a chunk without values (pre-training labels, which are not stored)."""
        values = array.values
        if len(values) == 0:
            return -1
        position = values.buffers()[1].address - mapped.address + 4 * values.offset
        if not 0 <= position <= mapped.size:
            raise RuntimeError(f"{self.path}: token buffer not read in place from the file")
        return position


def open_files_allowed() -> int:
    """How many files this process may have open: the soft limit raised to the hard one first (a cache of 100 B
    tokens has tens of thousands of token files; the usual soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


class _OpenFiles:
    """Read-only descriptors of ``paths``, at most ``capacity`` open at a time (the least recently read one
    closed first): all of them while they fit, so each is opened once."""

    def __init__(self, paths: list[Path], capacity: int):
        self.paths, self.capacity = paths, max(1, capacity)
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()  # file index -> fd
        self.opened = 0  # opens so far (one per file when they all fit)

    @property
    def fits_all(self) -> bool:
        return self.capacity >= len(self.paths)

    def fd(self, index: int) -> int:
        fd = self._open.get(index)
        if fd is not None:
            self._open.move_to_end(index)
            return fd
        if len(self._open) >= self.capacity:
            os.close(self._open.popitem(last=False)[1])
        fd = self._open[index] = os.open(self.paths[index], os.O_RDONLY)
        self.opened += 1
        return fd

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


class TokenCache:
    """Read access to the token files: per-document metadata in memory, tokens read on demand from disk.

    Pre-training labels are not stored: they are the ids with the first ``trained_from`` tokens of each document
    masked, made when the pieces are gathered (half the cache, half the reads). SFT labels are stored.
    """

    def __init__(self, paths: list[Path], categories: list[str], category_codes: np.ndarray, files: list[Path]):
        self.paths = list(paths)
        self._files = [_TokenFile(p) for p in self.paths]
        # a quarter of the allowance stays free for the rest of the process (the parts being written, datasets)
        allowed = open_files_allowed()
        self._open = _OpenFiles(self.paths, allowed // 4 * 3 - 64)
        # all open at once where they fit: a list lookup per piece read, not the pool's bookkeeping
        self._fds = [self._open.fd(i) for i in range(len(self.paths))] if self._open.fits_all else None
        if self._fds is None:
            log.warning("%d token files, at most %d open at a time (the limit of open files, ulimit -n, is %d): "
                        "writing the parts reopens files as it reads their pieces; raise the hard limit to go faster",
                        len(self.paths), self._open.capacity, allowed)
        chunks = [(i, *chunk) for i, f in enumerate(self._files) for chunk in f.chunks]
        self._chunk_file = np.array([c[0] for c in chunks], dtype=np.int64)
        self._ids_position = np.array([c[1] for c in chunks], dtype=np.int64)
        self._labels_position = np.array([c[2] for c in chunks], dtype=np.int64)
        self._first_doc = np.cumsum([0] + [len(c[3]) for c in chunks], dtype=np.int64)
        self._value_offset = np.concatenate([c[3] for c in chunks]) if chunks else np.zeros(0, np.int64)
        meta = {name: np.concatenate([f.meta[name] for f in self._files]) if self._files else np.zeros(0, np.int32)
                for name in META_COLUMNS + ("pid",)}
        for f in self._files:
            f.chunks, f.meta = [], {}
        self.tokenize_pids = sorted(np.unique(meta.pop("pid")).tolist())
        meta["category"] = np.asarray(category_codes, dtype=np.int32)[meta["category"]]
        self.docs = DocTable(**meta, categories=categories, files=files)
        self._stored_labels = bool((self.docs.trained_from < 0).any())

    def gather(self, doc: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and labels of the pieces ``(doc, start, length)``, concatenated in order: two new int32
        arrays, the caller's to change."""
        chunk = np.searchsorted(self._first_doc, doc, side="right") - 1
        skip = 4 * (self._value_offset[doc] + start)
        files, sizes = self._chunk_file[chunk].tolist(), (4 * length).tolist()
        ids = self._read(files, (self._ids_position[chunk] + skip).tolist(), sizes)
        if self._stored_labels:
            return ids, self._read(files, (self._labels_position[chunk] + skip).tolist(), sizes)
        piece_start = np.cumsum(length) - length
        position = np.arange(len(ids), dtype=np.int64) - np.repeat(piece_start, length)  # in the piece
        masked = position < np.repeat(self.docs.trained_from[doc] - start, length)
        return ids, np.where(masked, np.int32(IGNORE_INDEX), ids)

    def _read(self, files: list[int], positions: list[int], sizes: list[int]) -> np.ndarray:
        """The int32 values at byte ``positions[i]`` (``sizes[i]`` bytes) of token file ``files[i]``, concatenated."""
        values = np.empty(sum(sizes) // 4, dtype=np.int32)
        view, out = memoryview(values).cast("B"), 0
        fd_of = self._fds.__getitem__ if self._fds is not None else self._open.fd
        for file, position, n in zip(files, positions, sizes):
            if os.preadv(fd_of(file), [view[out: out + n]], position) != n:
                raise RuntimeError(f"token cache: short read at byte {position} of {self.paths[file]} (was a cache "
                                   "file changed?)")
            out += n
        return values

    def close(self) -> None:
        self._open.close()


_DONE = object()


class _Background:
    """Runs a generator in a thread, one item ahead of the consumer (reading overlaps tokenising); its errors are
    raised in the consumer, and the thread stops when the consumer does."""

    def __init__(self, generator: Iterator):
        self._generator, self._items, self._stop = generator, queue.Queue(maxsize=1), threading.Event()
        self._thread = threading.Thread(target=self._run, name="read", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self) -> None:
        try:
            for item in self._generator:
                if not self._put((item, None)):
                    break
            else:
                self._put((_DONE, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put((None, err))
        finally:
            self._generator.close()

    def __iter__(self):
        try:
            while True:
                item, err = self._items.get()
                if err is not None:
                    raise err
                if item is _DONE:
                    return
                yield item
        finally:
            self._stop.set()
            self._thread.join()


class TokenCacheBuilder:
    """Writes rows into raw blocks (Arrow) and tokenises each block into token files with ``Dataset.map``.

    With one process the next block is read (in a thread) while this one is tokenised; with ``num_proc``
    workers, blocks are larger (each ``map`` starts a pool) and reading pauses while they run (no fork while a
    thread runs).
    """

    def __init__(self, work_dir: Path, kind: str, function: Callable, fn_kwargs: dict, num_proc: int):
        self.work_dir, self.kind, self.function, self.fn_kwargs = Path(work_dir), kind, function, fn_kwargs
        self.num_proc = num_proc
        self.block_bytes = RAW_BLOCK_BYTES if num_proc == 1 else POOLED_BLOCK_BYTES
        self.first_block_bytes = FIRST_BLOCK_BYTES if num_proc == 1 else POOLED_BLOCK_BYTES
        self.token_files: list[Path] = []
        self.category_codes: dict[str, int] = {}  # in first-seen order

    def build(self, batches: Iterable[RowBatch], files: list[Path]) -> TokenCache:
        """Tokenise every row into the cache; categories get their sorted-name index."""
        blocks = self._raw_blocks(iter(batches))
        for raw_path in _Background(blocks) if self.num_proc == 1 else blocks:
            self._tokenize(raw_path)
        names = sorted(self.category_codes)
        codes = np.zeros(len(names), dtype=np.int32)
        for sorted_index, name in enumerate(names):
            codes[self.category_codes[name]] = sorted_index
        return TokenCache(self.token_files, names, codes, files)

    def _raw_blocks(self, batches: Iterator[RowBatch]) -> Iterator[Path]:
        """Write row batches into raw block files of about ``block_bytes`` of input each; yield each finished file."""
        features = RAW_FEATURES[self.kind]
        for block in itertools.count():
            path = self.work_dir / f"raw-{block:05d}.arrow"
            writer = ArrowWriter(features=features, path=str(path), writer_batch_size=MAP_BATCH_ROWS)
            written, taken, block_bytes = 0, 0, min(self.block_bytes, self.first_block_bytes << block)
            while taken < block_bytes:
                batch = next(batches, None)
                if batch is None:
                    break
                n = len(batch)
                writer.write_batch({"file": pa.array(np.full(n, batch.file, dtype=np.int32)),
                                    "line": pa.array(np.asarray(batch.line, dtype=np.int64)),
                                    "category": pa.array(self._category_codes(batch.category)), **batch.fields})
                written, taken = written + n, taken + batch.nbytes
            writer.finalize()
            writer.close()
            if not written:
                path.unlink()
                return
            yield path

    def _category_codes(self, names: list | pa.Array) -> np.ndarray:
        """int32 code of each category name (codes in first-seen order, made sorted-name indices at the end)."""
        codes = self.category_codes
        if isinstance(names, list):
            return np.array([codes.setdefault(name, len(codes)) for name in names], dtype=np.int32)
        encoded = names.dictionary_encode()
        known = np.array([codes.setdefault(name, len(codes)) for name in encoded.dictionary.to_pylist()],
                         dtype=np.int32)
        return known[encoded.indices.to_numpy(zero_copy_only=False)]

    def _tokenize(self, raw_path: Path) -> None:
        block = int(raw_path.stem.split("-")[1])
        raw = Dataset.from_file(str(raw_path))
        num_proc = self.num_proc if self.num_proc > 1 and len(raw) > 1 else None
        # one process: the read bar shows the rate (reading keeps one block ahead); workers: datasets' bar does
        with _tokenizer_threads(enabled=num_proc is None), _quiet_datasets(num_proc is None):
            out = raw.with_format("arrow").map(
                self.function, batched=True, batch_size=MAP_BATCH_ROWS, num_proc=num_proc, fn_kwargs=self.fn_kwargs,
                remove_columns=raw.column_names, features=TOKENIZED_FEATURES,
                cache_file_name=str(self.work_dir / f"tokens-{block:05d}.arrow"), load_from_cache_file=False,
                new_fingerprint=f"tokens-{self.kind}-{block:05d}", desc=f"tokenize block {block + 1}",
            )
        self.token_files.extend(Path(f["filename"]) for f in out.cache_files)
        del out, raw  # unmaps the raw block before it is deleted
        raw_path.unlink()


@contextlib.contextmanager
def _quiet_datasets(quiet: bool):
    """No per-block progress bars from ``datasets`` when ``quiet``."""
    enabled = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
