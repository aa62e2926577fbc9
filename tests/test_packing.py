"""Packing and binning as a specification, on the real document length mix of the pre-training corpora.

Lengths are the real documents' UTF-8 byte lengths divided by 3 (about one token per CJK character), so
the mix of short reviews, long news paragraphs and novel passages is the real one.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from colossal_llama.dataset.packing import FirstFit, category_rng, interleave, pack_category, split_into_bins
from colossal_llama.utils.jsonl import iter_jsonl


@pytest.fixture(scope="module")
def real_lengths(data_dir) -> np.ndarray:
    lengths = []
    for name in ("zh_news_peoples_daily_199801.jsonl", "zh_reviews.jsonl", "en_novel_botchan.jsonl"):
        for _, row in itertools.islice(iter_jsonl(data_dir / "pretrain" / name), 3000):
            lengths.append(max(1, len((row["source"] + row["target"]).encode("utf-8")) // 3 + 2))
    return np.array(lengths, dtype=np.int64)


def _check_lossless(sequences, lengths, docs, max_length):
    """Every token of every document is in exactly one piece; pieces of a document appear in order."""
    covered = {d: [] for d in docs}
    for seq in sequences:
        assert 0 < sum(p.length for p in seq) <= max_length
        for p in seq:
            covered[p.doc].append((p.start, p.length, p.chunk))
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
    docs = list(range(len(real_lengths)))
    sequences = pack_category(docs, real_lengths, max_length, np.random.default_rng(0))
    _check_lossless(sequences, real_lengths, docs, max_length)
    assert (real_lengths > 64).any()  # the real mix really exercises splitting at 64


def test_first_fit_fill_ratio_on_real_mix(real_lengths):
    docs = list(range(len(real_lengths)))
    sequences = pack_category(docs, real_lengths, 2048, np.random.default_rng(1))
    fill = real_lengths.sum() / (len(sequences) * 2048)
    lower_bound = int(np.ceil(real_lengths.sum() / 2048))
    assert fill > 0.97, fill
    assert len(sequences) <= lower_bound + 2


def test_first_fit_tree_matches_brute_force(real_lengths):
    """The segment tree picks exactly the first open sequence with room, like a linear scan would."""
    tree, free = FirstFit(300), []
    for n in real_lengths[:2000].clip(max=300).tolist():
        expected = next((i for i, f in enumerate(free) if f >= n), None)
        got = tree.first_with_room(n)
        assert got == expected
        if got is None:
            got = tree.open()
            free.append(300)
        tree.take(got, n)
        free[got] -= n


def test_packing_is_seeded(real_lengths):
    docs = list(range(len(real_lengths)))
    a = pack_category(docs, real_lengths, 512, category_rng(7, "news", "order"))
    b = pack_category(docs, real_lengths, 512, category_rng(7, "news", "order"))
    c = pack_category(docs, real_lengths, 512, category_rng(8, "news", "order"))
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
        larger = {tuple(len(r) for r in split_into_bins(num_items, num_bins, np.random.default_rng(s)))
                  for s in range(20)}
        assert sorted(other) == sorted(sizes) and len(larger) > 1  # which bins get the extra item varies


def test_interleave_keeps_each_category_in_order():
    streams = {"news": list(range(50)), "review": list(range(100, 130)), "novel": [999]}
    merged = interleave(streams, np.random.default_rng(5))
    assert sorted(merged, key=str) == sorted([(k, v) for k, vs in streams.items() for v in vs], key=str)
    for name, values in streams.items():
        assert [v for k, v in merged if k == name] == values
    assert merged != interleave(streams, np.random.default_rng(6))
    assert [k for k, _ in merged[:50]] != ["news"] * 50  # really mixed, not concatenated
