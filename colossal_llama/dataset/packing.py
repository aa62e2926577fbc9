"""Lossless packing of documents into sequences, and seeded per-category bins.

A *piece* is a contiguous slice of one document. Packing never drops or truncates: a document longer than
``max_length`` is split into full ``max_length`` chunks plus a remainder, each its own piece whose
``position_ids`` restart at 0. All other documents are placed whole by first-fit over a seeded shuffle.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, start + length)`` of document ``doc`` (an index into the tokenised dataset)."""

    doc: int
    start: int
    length: int
    chunk: int = 0  # 0 for a whole document or the first chunk of a split one


def category_rng(seed: int, category: str, purpose: str) -> np.random.Generator:
    """An RNG that depends only on (seed, category, purpose): adding a category changes no other one."""
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8")), zlib.crc32(purpose.encode())])


class FirstFit:
    """Open sequences with remaining capacity; ``place(n)`` returns the first one with room in O(log S).

    A max-segment-tree over the sequences' free space (unopened slots have 0), grown by doubling.
    """

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.size = 1
        self.tree = np.zeros(2, dtype=np.int64)
        self.count = 0

    def _grow(self):
        old_leaves = self.tree[self.size:]
        self.size *= 2
        tree = np.zeros(2 * self.size, dtype=np.int64)
        tree[self.size: self.size + len(old_leaves)] = old_leaves
        for i in range(self.size - 1, 0, -1):
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
        self.tree = tree

    def _set(self, slot: int, free: int):
        i = slot + self.size
        self.tree[i] = free
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def open(self) -> int:
        """Open a new, empty sequence (after all existing ones) and return its index."""
        if self.count == self.size:
            self._grow()
        slot = self.count
        self.count += 1
        self._set(slot, self.max_length)
        return slot

    def take(self, slot: int, n: int):
        self._set(slot, int(self.tree[slot + self.size]) - n)

    def first_with_room(self, n: int) -> int | None:
        if self.tree[1] < n:
            return None
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= n else 2 * i + 1
        return i - self.size


def pack_category(doc_indices: list[int], lengths: np.ndarray, max_length: int,
                  rng: np.random.Generator) -> list[list[Piece]]:
    """Pack the documents ``doc_indices`` (lengths ``lengths[doc]``) into sequences of <= ``max_length``.

    Documents are visited in a seeded random order; each whole document goes to the first open sequence
    with room (first-fit), else a new one. A longer document is split into chunks that each open a new
    sequence in order, so reading the sequences in index order yields its chunks in document order.
    Invariant: every token of every document is in exactly one piece.
    """
    bins = FirstFit(max_length)
    sequences: list[list[Piece]] = []
    for doc in rng.permutation(np.asarray(doc_indices, dtype=np.int64)).tolist():
        length = int(lengths[doc])
        if length <= max_length:
            slot = bins.first_with_room(length)
            if slot is None:
                slot = bins.open()
                sequences.append([])
            bins.take(slot, length)
            sequences[slot].append(Piece(doc, 0, length))
            continue
        for chunk, start in enumerate(range(0, length, max_length)):
            size = min(max_length, length - start)
            slot = bins.open()
            sequences.append([Piece(doc, start, size, chunk)])
            bins.take(slot, size)
    return sequences


def split_into_bins(num_items: int, num_bins: int, rng: np.random.Generator) -> list[range]:
    """Contiguous, as-even-as-possible ranges (sizes differ by at most 1); which bins get the extra item
    is seeded so bin 0 is not always the largest. Contiguity keeps split-document chunks in order."""
    base, extra = divmod(num_items, num_bins)
    sizes = np.full(num_bins, base, dtype=np.int64)
    sizes[rng.choice(num_bins, size=extra, replace=False)] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [range(int(bounds[k]), int(bounds[k + 1])) for k in range(num_bins)]


def interleave(streams: dict[str, list], rng: np.random.Generator) -> list[tuple[str, object]]:
    """A uniformly random merge of several ordered lists that keeps each list's own order."""
    labels = [name for name in sorted(streams) for _ in streams[name]]
    order = rng.permutation(len(labels)) if labels else []
    shuffled = [labels[i] for i in order]
    cursors = {name: iter(streams[name]) for name in streams}
    return [(name, next(cursors[name])) for name in shuffled]
