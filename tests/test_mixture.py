"""Replay mixtures: weights per --dataset entry and per category, sampled as a pure function of (seed, epoch)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from colossal_llama.training.mixture import Mixture, parse_category_weights, split_dataset_weight
from colossal_llama.utils.apportion import largest_remainder
from colossal_llama.utils.errors import UserInputError


def test_dataset_weight_is_an_optional_numeric_suffix():
    assert split_dataset_weight("out/stage1:0.3") == ("out/stage1", 0.3)
    assert split_dataset_weight("out/stage1") == ("out/stage1", None)
    assert split_dataset_weight("/data/c:d/x") == ("/data/c:d/x", None)  # a colon inside a path is not a weight
    with pytest.raises(UserInputError, match="weight -1 must be a positive number"):
        split_dataset_weight("out:-1")
    assert parse_category_weights("news=1, novel=0.2") == {"news": 1.0, "novel": 0.2}
    with pytest.raises(UserInputError, match="'novel' is not CATEGORY=WEIGHT"):
        parse_category_weights("news=1,novel")


def test_weights_of_0_leave_a_category_out_but_not_a_dataset_nor_everything():
    """A category weight may be 0 (``web=0`` leaves web out, as its error message and the docs say), but not every
    one; a ``--dataset`` weight must be positive (a dataset to leave out is not listed)."""
    assert parse_category_weights("news=1,web=0") == {"news": 1.0, "web": 0.0}
    with pytest.raises(UserInputError, match=r"^--category_weights news=0,web=0: every weight is 0$"):
        parse_category_weights("news=0,web=0")
    for arg in ("out/stage1:0", "out/stage1:-0.5", "out/stage1:nan"):
        with pytest.raises(UserInputError, match="must be a positive number"):
            split_dataset_weight(arg)

def _groups(sizes, start=0):
    """One bucket; (dataset, category) -> consecutive global row ids from ``start``."""
    out = []
    for key, n in sizes.items():
        out.append((key, np.arange(start, start + n)))
        start += n
    return out


def _mix(mixture, order):
    owner = {int(r): g.key for groups in mixture.buckets for g in groups for r in g.rows}
    counts = Counter(owner[int(r)] for r in order)
    return {key: n / len(order) for key, n in counts.items()}


def test_dataset_weights_set_the_realised_mix_whatever_the_sizes():
    sizes = {(0, "news"): 9000, (0, "review"): 3000, (1, "novel"): 800}
    mixture = Mixture.build([_groups(sizes)], dataset_weights={0: 0.7, 1: 0.3}, category_weights={})
    order = mixture.epoch_order(seed=1, epoch=0, shuffle_buckets=False)
    assert len(order) == sum(sizes.values())  # an epoch keeps the data's size
    mix = _mix(mixture, order)
    assert abs(mix[(1, "novel")] - 0.3) < 0.02  # the replay share, although novel is 6 % of the rows
    assert abs(mix[(0, "news")] - 0.7 * 0.75) < 0.02 and abs(mix[(0, "review")] - 0.7 * 0.25) < 0.02


def test_category_weights_set_shares_within_a_dataset():
    sizes = {(0, "news"): 9000, (0, "novel"): 300}
    mixture = Mixture.build([_groups(sizes)], {}, parse_category_weights("news=1,novel=0.2"))
    mix = _mix(mixture, mixture.epoch_order(seed=3, epoch=0, shuffle_buckets=False))
    assert abs(mix[(0, "novel")] - 0.2 / 1.2) < 0.02 and abs(mix[(0, "news")] - 1 / 1.2) < 0.02


def test_every_category_needs_a_weight():
    with pytest.raises(UserInputError, match=r"no weight for categories \['review'\]"):
        Mixture.build([_groups({(0, "news"): 5, (0, "review"): 5})], {}, {"news": 1.0})


def test_order_is_a_pure_function_of_seed_and_epoch_and_streams_through_small_groups():
    sizes = {(0, "news"): 500, (1, "novel"): 50}
    mixture = Mixture.build([_groups(sizes), _groups({(0, "news"): 40, (1, "novel"): 10}, start=550)],
                            {0: 0.8, 1: 0.2}, {})
    e0 = mixture.epoch_order(seed=5, epoch=0, shuffle_buckets=False)
    assert np.array_equal(e0, mixture.epoch_order(seed=5, epoch=0, shuffle_buckets=False))
    assert not np.array_equal(e0, mixture.epoch_order(seed=5, epoch=1, shuffle_buckets=False))
    assert len(e0) == 600 and set(e0[:550]) <= set(range(550)) and set(e0[550:]) <= set(range(550, 600))
    # novel is up-weighted (its 50 rows give 110 of bucket 0's 550 draws): every row twice, then 10 a third time
    novel = Counter(int(r) for r in e0[:550] if 500 <= r < 550)
    assert sum(novel.values()) == 110 and Counter(novel.values()) == {2: 40, 3: 10}


def test_a_down_weighted_group_shows_new_rows_each_epoch():
    sizes = {(0, "news"): 1000, (1, "novel"): 1000}
    mixture = Mixture.build([_groups(sizes)], {0: 0.9, 1: 0.1}, {})
    seen = [set(int(r) for r in mixture.epoch_order(9, e, False) if r >= 1000) for e in range(10)]
    assert all(len(s) == 200 for s in seen)  # 10 % of 2,000 sequences per epoch
    assert not set.intersection(*seen[:5]) and len(set.union(*seen[:5])) == 1000  # 5 epochs cover all once


def test_largest_remainder_is_exact_to_one():
    counts = largest_remainder([0.5, 0.3333, 0.1667], 10)
    assert counts.sum() == 10 and all(abs(c - s * 10) < 1 for c, s in zip(counts, [0.5, 0.3333, 0.1667]))


def test_largest_remainder_gives_the_leftover_to_the_largest_remainders_ties_to_the_earlier_group():
    """Stored answers (a mixture's counts, hence every released epoch order, rest on this rule): the leftover goes
    one each to the largest fractional parts, whatever their position; on equal parts the earlier group wins."""
    assert largest_remainder([0.4667, 0.2333, 0.3], 1000).tolist() == [467, 233, 300]  # .7 beats .3 and .0
    assert largest_remainder([0.12, 0.47, 0.41], 10).tolist() == [1, 5, 4]  # the middle group's .7
    assert largest_remainder([0.25, 0.25, 0.5], 6).tolist() == [2, 1, 3]  # 1.5 and 1.5 (exact): the earlier
    assert largest_remainder([1 / 3] * 3, 10).tolist() == [4, 3, 3]  # a three-way tie: the first
    assert largest_remainder([0.5, 0.5], 7).tolist() == [4, 3]
    # more groups than numpy sorts by insertion (16): 12 tied parts of .625 for 10 leftovers, the first 10 win
    assert largest_remainder([3 / 48, 1 / 48] * 12, 10).tolist() == [1, 0] * 10 + [0] * 4


def _apportioned(shares, total: int) -> list:
    """The first release's counts, written out here (not the library's largest_remainder, whose rule it pins):
    floor(share x total) each, then one more to each of the largest fractional parts (the earlier on a tie)."""
    exact = [float(np.float64(s) * total) for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _order_as_first_released(mixture, seed: int, epoch: int, shuffle_buckets: bool) -> np.ndarray:
    """The order as the mixture first drew it (int64 permutations and copies): checkpoints made then resume at a
    sample index into this order, so it must never change."""
    import zlib

    def stream(rows, key, start, count):
        n = len(rows)
        first, last = start // n, (start + count - 1) // n
        cycles = [rows[np.random.default_rng([*key, c]).permutation(n)] for c in range(first, last + 1)]
        return np.concatenate(cycles)[start - first * n: start - first * n + count] if count else rows[:0]

    order = []
    for k, groups in enumerate(mixture.buckets):
        counts = _apportioned([g.share for g in groups], sum(len(g.rows) for g in groups))
        rows = np.concatenate([stream(g.rows, [seed, k, g.key[0], zlib.crc32(g.key[1].encode())], epoch * n, n)
                               for g, n in zip(groups, counts)])
        order.append(rows[np.random.default_rng([seed, epoch, k]).permutation(len(rows))])
    everything = np.concatenate(order)
    if shuffle_buckets:
        everything = everything[np.random.default_rng([seed, epoch]).permutation(len(everything))]
    return everything


@pytest.mark.parametrize("dataset_weights, category_weights, counts", [
    ({0: 0.7, 1: 0.3}, {}, [[467, 233, 300], [5, 2], [1750, 750]]),
    ({}, {"zh": 1, "en": 0.2}, [[417, 83, 500], [4, 3], [1250, 1250]]),  # 3.5 and 3.5: the earlier group
    ({0: 3.0, 1: 0.01}, {"zh": 0, "en": 1}, [[0, 1000, 0], [0, 7], [2500, 0]])])
def test_the_order_is_the_first_releases_in_4_byte_indices(dataset_weights, category_weights, counts):
    buckets = [_groups({(0, "zh"): 600, (0, "en"): 300, (1, "zh"): 100}),
               _groups({(0, "zh"): 4, (1, "en"): 3}, start=1000),
               _groups({(0, "en"): 1500, (1, "zh"): 1000}, start=1007)]
    if category_weights:
        for groups in buckets:  # every category of the data needs a weight
            assert {key[1] for key, _ in groups} <= set(category_weights)
    mixture = Mixture.build(buckets, dataset_weights, category_weights)
    assert [_apportioned([g.share for g in groups], n) for groups, n in zip(mixture.buckets, mixture.draws)] == counts
    for epoch in (0, 1, 5):
        for shuffle in (False, True):
            order = mixture.epoch_order(seed=3, epoch=epoch, shuffle_buckets=shuffle)
            assert order.itemsize == 4
            assert np.array_equal(order, _order_as_first_released(mixture, 3, epoch, shuffle)), (epoch, shuffle)


def test_a_bucket_of_data_weighted_0_gives_its_size_to_the_others():
    """``web=0`` with a bin holding only web rows (books had fewer documents than bins): that bucket's shares all
    being 0, largest_remainder returned counts that did not sum to its size, so the epoch drew rows of the
    excluded category and came out short of the sampler's plan (empty micro-batches, a collator crash). Now the
    bucket gives no sequence, the others draw its size, and no web row is drawn."""
    from colossal_llama.training.data import StepBatchSampler

    books, web_a, web_b = (np.arange(a, b, dtype=np.uint32) for a, b in ((6, 8), (0, 6), (8, 16)))
    groups = [[((0, "books"), books), ((0, "web"), web_a)], [((0, "web"), web_b)]]
    mixture = Mixture.build(groups, {}, {"web": 0.0, "books": 1.0})
    assert mixture.bucket_sizes == [16, 0]
    order = mixture.epoch_order(seed=1, epoch=0, shuffle_buckets=False)
    assert len(order) == 16 and set(order.tolist()) == {6, 7}  # books only, as often as the epoch needs
    sampler = StepBatchSampler([8, 8], 2, 1, 0, 1, 1, False, 0, 0, mixture)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 8 and all(len(b) == 2 for b in batches)
    with pytest.raises(ValueError):
        largest_remainder([0.0, 0.0], 10)  # was [1, 1]: 2, not 10


def test_weights_on_some_datasets_only_are_refused():
    """``--dataset new:0.7 old`` weighed old 1.0 (the unweighted default): new trained 41 %, not the 70 % asked."""
    from types import SimpleNamespace

    from colossal_llama.training.inputs import _mixture

    cfg = SimpleNamespace(dataset=["new:0.7", "old"], category_weights=None)
    with pytest.raises(UserInputError, match="^--dataset: old has no weight while others have one"):
        _mixture(cfg, None)


def test_rows_are_grouped_by_key_in_one_sort_each_group_in_stored_order():
    """The mixture's groups and the validation plan's categories: each distinct key (sorted) with the indices of
    its items ascending, offset by where the bucket starts, in the row index type; nothing for no items."""
    from colossal_llama.utils.groups import grouped_rows

    distinct, members = grouped_rows(np.array([3, 1, 3, 2, 1, 3]), start=10, dtype=np.uint32)
    assert distinct.tolist() == [1, 2, 3]
    assert [m.tolist() for m in members] == [[11, 14], [13], [10, 12, 15]]
    assert all(m.dtype == np.uint32 for m in members)
    names, rows = grouped_rows(np.array(["novel", "news", "novel"]))
    assert names.tolist() == ["news", "novel"] and [r.tolist() for r in rows] == [[1], [0, 2]]
    assert grouped_rows(np.zeros(0, np.int64))[1] == []
