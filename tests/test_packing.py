"""Packing and binning as a specification, on the real document length mix of the pre-training corpora.

Lengths are the real documents' UTF-8 byte lengths divided by 3 (about one token per CJK character), so
the mix of short reviews, long news paragraphs and novel passages is the real one.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from colossal_llama.dataset.packing import (FirstFit, category_rng, interleave, pack_documents, plan_parts,
                                            split_into_bins)
from colossal_llama.utils.jsonl import iter_jsonl


@pytest.fixture(scope="module")
def real_lengths(data_dir) -> np.ndarray:
    lengths = []
    for name in ("zh_news_peoples_daily_199801.jsonl", "zh_reviews.jsonl", "en_novel_botchan.jsonl"):
        for _, row in itertools.islice(iter_jsonl(data_dir / "pretrain" / name), 3000):
            lengths.append(max(1, len((row["source"] + row["target"]).encode("utf-8")) // 3 + 2))
    return np.array(lengths, dtype=np.int64)


def _pack(lengths, max_length, rng):
    docs = np.arange(len(lengths))
    return pack_documents(docs, lengths[docs], max_length, rng)


def _check_lossless(sequences, lengths, docs, max_length):
    """Every token of every document is in exactly one piece; pieces of a document appear in order."""
    covered = {d: [] for d in docs}
    assert (sequences.tokens == [sum(n for _, _, n in sequences.pieces(s)) for s in range(len(sequences))]).all()
    for s in range(len(sequences)):
        seq = sequences.pieces(s)
        assert 0 < sum(n for _, _, n in seq) <= max_length
        for doc, start, length in seq:
            covered[doc].append((start, length, start // max_length))
    for d in docs:
        pieces = covered[d]
        assert [c for _, _, c in pieces] == list(range(len(pieces)))   # chunks in sequence order
        starts = [s for s, _, _ in pieces]
        assert starts == sorted(starts) and starts[0] == 0
        assert sum(n for _, n, _ in pieces) == lengths[d]
        assert all(s + n == s2 for (s, n, _), (s2, _, _) in zip(pieces, pieces[1:]))
        assert len(pieces) == (1 if lengths[d] <= max_length else -(-int(lengths[d]) // max_length))


@pytest.mark.parametrize("max_length", [64, 512, 4096])
def test_packing_is_lossless_and_splits_only_long_documents(real_lengths, max_length):
    sequences = _pack(real_lengths, max_length, np.random.default_rng(0))
    _check_lossless(sequences, real_lengths, range(len(real_lengths)), max_length)
    assert (real_lengths > 64).any()  # the real mix really exercises splitting at 64


def test_first_fit_fill_ratio_on_real_mix(real_lengths):
    sequences = _pack(real_lengths, 2048, np.random.default_rng(1))
    fill = real_lengths.sum() / (len(sequences) * 2048)
    lower_bound = int(np.ceil(real_lengths.sum() / 2048))
    assert fill > 0.97, fill
    assert len(sequences) <= lower_bound + 2


def test_first_fit_tree_matches_brute_force(real_lengths):
    """The segment tree puts each document exactly where a linear scan would: the first open sequence with room,
    else a new one; and its root always holds the largest free space."""
    tree, free = FirstFit(300), []
    for n in real_lengths[:2000].clip(max=300).tolist():
        expected = next((i for i, f in enumerate(free) if f >= n), len(free))
        if expected == len(free):
            free.append(300)
        free[expected] -= n
        assert tree.place(n) == expected
        assert tree.tree[1] == max(free)
    assert tree.count == len(free)


def test_packing_is_seeded(real_lengths):
    def flat(seqs):
        return [seqs.pieces(s) for s in range(len(seqs))]

    a = flat(_pack(real_lengths, 512, category_rng(7, "news", "order")))
    b = flat(_pack(real_lengths, 512, category_rng(7, "news", "order")))
    c = flat(_pack(real_lengths, 512, category_rng(8, "news", "order")))
    assert a == b
    assert a != c


@pytest.mark.parametrize("num_items,num_bins", [(958, 10), (7, 10), (10, 10), (0, 3), (101, 1)])
def test_bins_are_contiguous_even_and_seeded(num_items, num_bins):
    ranges = split_into_bins(num_items, num_bins, np.random.default_rng(3))
    assert len(ranges) == num_bins
    assert [i for r in ranges for i in r] == list(range(num_items))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1
    if 0 < num_items % num_bins:
        other = [len(r) for r in split_into_bins(num_items, num_bins, np.random.default_rng(4))]
        larger = {s: [len(r) for r in split_into_bins(num_items, num_bins, np.random.default_rng(s))]
                  for s in range(20)}
        assert sorted(other) == sorted(sizes) and len({tuple(v) for v in larger.values()}) > 1  # which bins get
        # the extra item varies with the seed, and only with it: the same seed gives the same split (20 seeds, each
        # twice), another seed another one
        assert all([len(r) for r in split_into_bins(num_items, num_bins, np.random.default_rng(s))] == larger[s]
                   for s in range(20))
        assert larger[3] == sizes and larger[4] == other != sizes


def test_interleave_keeps_each_category_in_order():
    counts = [50, 30, 1]  # news, novel, review
    stream, rank = interleave(counts, np.random.default_rng(5))
    assert sorted(zip(stream.tolist(), rank.tolist())) == [(c, r) for c, n in enumerate(counts) for r in range(n)]
    for c, n in enumerate(counts):
        assert rank[stream == c].tolist() == list(range(n))  # each category's own order is kept
    assert stream.tolist() != interleave(counts, np.random.default_rng(6))[0].tolist()
    assert stream[:50].tolist() != [0] * 50  # really mixed, not concatenated


def test_unpacked_rows_are_every_document_once_in_a_seeded_shuffle(real_lengths):
    """Without packing (SFT's default) each document is one row; rows are a seeded shuffle of the category's
    documents (not the input order), each document exactly once, whole."""
    docs = [np.arange(0, 3000), np.arange(3000, 6000)]

    def rows(seed):
        plan = plan_parts(docs, real_lengths, ["news", "reviews"], max_length=512, num_bins=3, seed=seed, pack=False)
        seqs = plan.sequences
        assert (seqs.offsets == np.arange(len(seqs) + 1)).all() and (seqs.start == 0).all()
        assert (seqs.length == real_lengths[seqs.doc]).all()
        return [int(d) for _, part in plan.parts for d in seqs.doc[part]]

    first = rows(5)
    assert sorted(first) == list(range(6000))
    for c in docs:
        in_category = [d for d in first if d in set(c.tolist())]
        assert in_category != sorted(in_category)  # shuffled, not the input order
    assert rows(5) == first and rows(6) != first


def test_bins_a_category_leaves_empty_are_reported(real_lengths):
    """A category with fewer rows than bins leaves bins empty; they are reported per category (a category of a
    single document too; one without documents is not a category of this split), and no part is empty here."""
    docs = [np.arange(0, 20), np.array([20]), np.zeros(0, dtype=np.int64)]
    plan = plan_parts(docs, real_lengths, ["news", "novel", "none"], max_length=4096, num_bins=3, seed=1, pack=False)
    assert plan.empty_parts == [] and [k for k, _ in plan.parts] == [0, 1, 2]
    with_novel = [k for k, part in plan.parts if (plan.seq_category[part] == 1).any()]
    assert len(with_novel) == 1
    assert plan.empty_bins == {"novel": [k for k in range(3) if k not in with_novel]}
