"""Lossless packing of documents into sequences, seeded per-category bins, and the plan of every output part.

Everything here works on document *lengths* only (numpy arrays), never on tokens: the plan of a run with
billions of tokens is a few arrays of a few bytes per document.

A *piece* is a contiguous slice ``[start, start + length)`` of one document. Packing never drops or truncates:
a document longer than ``max_length`` is split into full ``max_length`` chunks plus a remainder, each its own
piece (chunk ``start // max_length``) whose ``position_ids`` restart at 0. All other documents are placed whole
by first-fit over a seeded shuffle.
"""
from __future__ import annotations

import zlib
from array import array
from dataclasses import dataclass, field

import numpy as np

_LOOP_CHUNK = 1 << 16  # documents converted to Python ints at a time by the packing loop


def category_rng(seed: int, category: str, purpose: str) -> np.random.Generator:
    """An RNG that depends only on (seed, category, purpose): adding a category changes no other one."""
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8")), zlib.crc32(purpose.encode())])


class FirstFit:
    """Open sequences with remaining capacity; ``place(n)`` puts n tokens into the first one with room in O(log S).

    A max-segment-tree over the sequences' free space (unopened slots have 0), grown by doubling; stored in a
    compact ``array('q')`` (8 bytes per node, fast scalar access from Python).
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.size = 1
        self.tree = array("q", [0, 0])
        self.count = 0

    def _grow(self):
        size = 2 * self.size
        tree = np.zeros(2 * size, dtype=np.int64)
        tree[size: size + self.size] = np.frombuffer(self.tree, dtype=np.int64)[self.size:]
        half = size // 2
        while half >= 1:  # rebuild the inner levels bottom-up, one numpy op per level
            tree[half: 2 * half] = np.maximum(tree[2 * half: 4 * half: 2], tree[2 * half + 1: 4 * half: 2])
            half //= 2
        self.tree, self.size = array("q", tree.tobytes()), size

    def _set(self, slot: int, free: int):
        tree = self.tree
        i = slot + self.size
        tree[i] = free
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            best = left if left > right else right
            if tree[i] == best:  # unchanged here, so unchanged above
                break
            tree[i] = best
            i >>= 1

    def open(self) -> int:
        """Open a new, empty sequence (after all existing ones) and return its index."""
        if self.count == self.size:
            self._grow()
        slot = self.count
        self.count += 1
        self._set(slot, self.max_length)
        return slot

    def take(self, slot: int, n: int):
        self._set(slot, self.tree[slot + self.size] - n)

    def place(self, n: int) -> int:
        """Put ``n`` tokens into the first sequence with room for them (a new one when none has) -> its index.

        The hot loop of packing: one descent to the leaf and one early-stopping climb, inlined."""
        tree, size = self.tree, self.size
        if tree[1] < n:
            slot = self.open()
            self.take(slot, n)
            return slot
        i = 1
        while i < size:
            i = 2 * i if tree[2 * i] >= n else 2 * i + 1
        tree[i] -= n
        slot = i - size
        i >>= 1
        while i:
            left, right = tree[2 * i], tree[2 * i + 1]
            best = left if left > right else right
            if tree[i] == best:
                break
            tree[i] = best
            i >>= 1
        return slot


@dataclass
class Sequences:
    """Sequences as flat arrays: sequence ``s`` is the pieces ``offsets[s]:offsets[s + 1]``, in order; piece
    ``p`` is tokens ``[start[p], start[p] + length[p])`` of document ``doc[p]``."""

    doc: np.ndarray      # int64 [pieces]
    start: np.ndarray    # int64 [pieces]
    length: np.ndarray   # int64 [pieces]
    offsets: np.ndarray  # int64 [sequences + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> np.ndarray:
        """Tokens per sequence."""
        cumulative = np.concatenate([[0], np.cumsum(self.length)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def pieces(self, s: int) -> list[tuple[int, int, int]]:
        """``(doc, start, length)`` of each piece of sequence ``s``."""
        a, b = self.offsets[s], self.offsets[s + 1]
        return list(zip(self.doc[a:b].tolist(), self.start[a:b].tolist(), self.length[a:b].tolist()))

    def piece_indices(self, rows: np.ndarray) -> np.ndarray:
        """Indices of the pieces of sequences ``rows``, row after row."""
        first, counts = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        total = int(counts.sum())
        row_start = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(rows) else np.zeros(0, dtype=np.int64)
        return np.repeat(first - row_start, counts) + np.arange(total, dtype=np.int64)

    @classmethod
    def one_per_document(cls, docs: np.ndarray, lengths: np.ndarray) -> "Sequences":
        """Each document (whole) in its own sequence, in the given order."""
        n = len(docs)
        return cls(np.asarray(docs, dtype=np.int64), np.zeros(n, dtype=np.int64),
                   np.asarray(lengths, dtype=np.int64), np.arange(n + 1, dtype=np.int64))

    @classmethod
    def concatenate(cls, parts: list["Sequences"]) -> "Sequences":
        if not parts:
            return cls.one_per_document(np.zeros(0, np.int64), np.zeros(0, np.int64))
        piece_base = np.cumsum([0] + [len(p.doc) for p in parts[:-1]])
        offsets = [parts[0].offsets[:1]] + [p.offsets[1:] + base for p, base in zip(parts, piece_base)]
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("doc", "start", "length")),
                   np.concatenate(offsets))


def pack_documents(docs: np.ndarray, lengths: np.ndarray, max_length: int, rng: np.random.Generator,
                   progress=None) -> Sequences:
    """Pack documents ``docs`` (with ``lengths``, aligned) into sequences of <= ``max_length`` tokens.

    Documents are visited in a seeded random order; each whole document goes to the first open sequence
    with room (first-fit), else a new one. A longer document is split into chunks that each open a new
    sequence in order, so reading the sequences in index order yields its chunks in document order.
    Invariant: every token of every document is in exactly one piece. ``progress.update(n)`` is told of the
    documents placed (a tqdm bar, say).
    """
    docs, lengths = np.asarray(docs, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(docs))
    fit = FirstFit(max_length)
    place = fit.place
    p_doc, p_start, p_len, p_seq = array("q"), array("q"), array("q"), array("q")
    for begin in range(0, len(order), _LOOP_CHUNK):
        chosen = order[begin: begin + _LOOP_CHUNK]
        for doc, length in zip(docs[chosen].tolist(), lengths[chosen].tolist()):
            if length <= max_length:
                slot = place(length)
                p_doc.append(doc)
                p_start.append(0)
                p_len.append(length)
                p_seq.append(slot)
                continue
            for start in range(0, length, max_length):
                size = min(max_length, length - start)
                slot = fit.open()
                fit.take(slot, size)
                p_doc.append(doc)
                p_start.append(start)
                p_len.append(size)
                p_seq.append(slot)
        if progress is not None:
            progress.update(len(chosen))
    seq = np.frombuffer(p_seq, dtype=np.int64)
    by_seq = np.argsort(seq, kind="stable")  # pieces of a sequence in the order they were placed
    offsets = np.zeros(fit.count + 1, dtype=np.int64)
    np.cumsum(np.bincount(seq, minlength=fit.count), out=offsets[1:])
    return Sequences(*(np.frombuffer(a, dtype=np.int64)[by_seq] for a in (p_doc, p_start, p_len)), offsets)


def split_into_bins(num_items: int, num_bins: int, rng: np.random.Generator) -> list[range]:
    """Contiguous, as-even-as-possible ranges (sizes differ by at most 1); which bins get the extra item
    is seeded so bin 0 is not always the largest. Contiguity keeps split-document chunks in order."""
    base, extra = divmod(num_items, num_bins)
    sizes = np.full(num_bins, base, dtype=np.int64)
    sizes[rng.choice(num_bins, size=extra, replace=False)] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [range(int(bounds[k]), int(bounds[k + 1])) for k in range(num_bins)]


def interleave(counts, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random merge of ordered streams (stream ``i`` has ``counts[i]`` items) that keeps each
    stream's own order. Returns, per merged position, ``(stream, rank of the item within its stream)``."""
    counts = np.asarray(counts, dtype=np.int64)
    labels = np.repeat(np.arange(len(counts)), counts)
    stream = labels[rng.permutation(len(labels))]
    rank = np.empty(len(stream), dtype=np.int64)
    rank[np.argsort(stream, kind="stable")] = np.arange(len(stream)) - np.repeat(np.cumsum(counts) - counts, counts)
    return stream, rank


@dataclass
class Plan:
    """Every output row of one split, as sequence numbers into :attr:`sequences`.

    Sequences of category ``c`` (index into ``categories``) are contiguous; ``parts`` holds, per non-empty bin,
    ``(bin, rows)``: part k = bin k of every category, categories interleaved by a seeded, order-keeping merge.
    """

    sequences: Sequences
    seq_category: np.ndarray  # int32 [sequences]
    categories: list[str]
    parts: list[tuple[int, np.ndarray]]
    empty_bins: dict[str, list[int]] = field(default_factory=dict)
    empty_parts: list[int] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)


def plan_parts(docs_per_category: list[np.ndarray], lengths: np.ndarray, categories: list[str], *, max_length: int,
               num_bins: int, seed: int, pack: bool, purpose: str = "", progress=None) -> Plan:
    """Arrange the documents ``docs_per_category[c]`` (in document order) of every category into ``num_bins``
    parts: packed (first-fit, long documents split) when ``pack``, else one document per row in a seeded order.
    ``purpose`` keeps the random streams of another split (the held-out one) independent of the training split.
    """
    per_category, seq_category, bin_ranges = [], [], []
    for c, docs in enumerate(docs_per_category):
        rng = category_rng(seed, categories[c], purpose + "order")
        if pack:
            seqs = pack_documents(docs, lengths[docs], max_length, rng, progress)
        else:
            shuffled = np.asarray(docs, dtype=np.int64)[rng.permutation(len(docs))]
            seqs = Sequences.one_per_document(shuffled, lengths[shuffled])
        per_category.append(seqs)
        seq_category.append(np.full(len(seqs), c, dtype=np.int32))
        bin_ranges.append(split_into_bins(len(seqs), num_bins, category_rng(seed, categories[c], purpose + "bins")))
    first_seq = np.cumsum([0] + [len(s) for s in per_category[:-1]]).astype(np.int64)
    plan = Plan(Sequences.concatenate(per_category),
                np.concatenate(seq_category) if seq_category else np.zeros(0, np.int32), list(categories), [])
    for c, ranges in enumerate(bin_ranges):
        empty = [k for k, r in enumerate(ranges) if not r]
        if empty and len(docs_per_category[c]):
            plan.empty_bins[categories[c]] = empty
    for k in range(num_bins):
        counts = [len(ranges[k]) for ranges in bin_ranges]
        stream, rank = interleave(counts, category_rng(seed, "", f"{purpose}interleave-{k}"))
        if len(stream) == 0:
            plan.empty_parts.append(k)
            continue
        bin_start = np.array([first_seq[c] + ranges[k].start for c, ranges in enumerate(bin_ranges)], dtype=np.int64)
        plan.parts.append((k, bin_start[stream] + rank))
    return plan
