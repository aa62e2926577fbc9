"""Replay mixtures: ``--dataset DIR:0.3`` and ``--category_weights news=1,novel=0.2``.

A group is the rows of one (``--dataset`` entry, category) inside one bucket. With weights, an epoch still holds
as many sequences as the data (bucket k keeps its size), but they are drawn from the groups in proportion to
their weights, not their sizes:

    share(d, c) = w_d / sum of the dataset weights in the bucket
                  x (w_c / sum of the category weights of d in the bucket, with --category_weights;
                     else the category's natural share of d)

so ``--dataset new:0.7 old:0.3`` trains 70 % on new data and 30 % on old (stage-1) data, whatever their sizes.
Counts are rounded by largest remainder (the realised mix is exact to one sequence per group and bucket). Each
group is read as an endless stream of seeded permutations of its rows; epoch e takes the next slice of it, so a
down-weighted group shows different rows every epoch and repeats a row only once all were seen, and an
up-weighted one cycles. Everything is a pure function of (seed, epoch): resume stays exact.
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from colossal_llama.utils.apportion import largest_remainder
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)
GroupKey = Tuple[int, str]  # (index of the --dataset entry, category)


def row_index_dtype(num_rows: int) -> np.dtype:
    """Row indices take 4 bytes up to 2**32 rows (17 T tokens in sequences of 4,096), else 8."""
    return np.dtype(np.uint32 if num_rows < 2**32 else np.int64)


def split_dataset_weight(arg: str) -> Tuple[str, Optional[float]]:
    """``"DIR:0.3"`` -> ``("DIR", 0.3)``; ``"DIR"`` -> ``("DIR", None)`` (a path may itself hold ``:``; only a
    numeric suffix is a weight)."""
    head, sep, tail = arg.rpartition(":")
    if not sep or not head:
        return arg, None
    try:
        weight = float(tail)
    except ValueError:
        return arg, None
    if not math.isfinite(weight) or weight <= 0:
        raise UserInputError(f"--dataset {arg}: weight {tail} must be a positive number")
    return head, weight


def parse_category_weights(text: Optional[str]) -> Dict[str, float]:
    """``"news=1,novel=0.2"`` -> ``{"news": 1.0, "novel": 0.2}``."""
    if not text:
        return {}
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not name.strip() or not math.isfinite(weight) or weight < 0:
            raise UserInputError(f"--category_weights {text}: {item!r} is not CATEGORY=WEIGHT with a weight >= 0")
        weights[name.strip()] = weight
    if not any(weights.values()):
        raise UserInputError(f"--category_weights {text}: every weight is 0")
    return weights


@dataclass
class Group:
    key: GroupKey
    rows: np.ndarray  # global row indices (into the concatenated training set), in stored order
    share: float  # fraction of its bucket's sequences drawn from this group


def _shares(groups: Sequence[Tuple[GroupKey, int]], dataset_weights: Dict[int, float],
            category_weights: Dict[str, float]) -> List[float]:
    """Shares of ``(key, size)`` groups of one bucket (see the module docstring); they sum to 1."""
    datasets = sorted({d for (d, _), _ in groups})
    total_w = sum(dataset_weights.get(d, 1.0) for d in datasets)
    # each dataset's sums once, in group order (a sum per group was O(groups^2): 37 s for 4,000 categories)
    sizes, weights = dict.fromkeys(datasets, 0), dict.fromkeys(datasets, 0.0)
    for (d, c), size in groups:
        sizes[d] += size
        weights[d] += category_weights[c] if category_weights else 0.0
    shares = []
    for (d, c), size in groups:
        within = category_weights[c] / (weights[d] or 1.0) if category_weights else size / sizes[d]
        shares.append(dataset_weights.get(d, 1.0) / total_w * within)
    return shares


def _draws(buckets: List[List[Group]]) -> List[int]:
    """Each bucket's sequences per epoch: its size; a bucket whose groups all weigh 0 (say ``web=0`` and a bin
    that holds only web rows, the other categories having fewer documents than bins) gives none, and its size
    goes to the others in proportion to theirs, so an epoch keeps the data's size. (It drew rows of the excluded
    category and left the epoch short: empty micro-batches.)"""
    sizes = [sum(len(g.rows) for g in groups) for groups in buckets]
    weighed = [sum(g.share for g in groups) > 0 for groups in buckets]
    if not any(weighed):
        raise UserInputError("--dataset / --category_weights: every sequence of the data weighs 0")
    moved = sum(size for size, w in zip(sizes, weighed) if not w)
    kept = [size if w else 0 for size, w in zip(sizes, weighed)]
    if moved:
        empty = [k for k, w in enumerate(weighed) if not w]
        log.warning("buckets %s hold only data weighted 0: their %d sequences an epoch are drawn from the other "
                    "buckets instead", empty, moved)
        kept = (np.asarray(kept) + largest_remainder(np.asarray(kept) / sum(kept), moved)).tolist()
    return [int(n) for n in kept]


def _stream(rows: np.ndarray, key: Sequence[int], start: int, count: int) -> np.ndarray:
    """Items ``start .. start+count`` of the endless sequence perm_0(rows), perm_1(rows), ... (seeded by key)."""
    if count == 0:
        return rows[:0]
    n = len(rows)
    first, last = start // n, (start + count - 1) // n
    cycles = [_shuffled(rows, np.random.default_rng([*key, cycle])) for cycle in range(first, last + 1)]
    return np.concatenate(cycles)[start - first * n: start - first * n + count]


def _shuffled(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``rows[rng.permutation(len(rows))]``, without the int64 permutation: numpy's in-place shuffle moves items
    exactly as that permutation does."""
    out = rows.copy()
    rng.shuffle(out)
    return out


class Mixture:
    """Per bucket, the groups to draw from and their shares, and ``draws[k]``, the sequences bucket k gives an
    epoch (its size; see :meth:`build` for a bucket whose groups all weigh 0); :meth:`epoch_order` is the
    sampler's order. Invariant: ``sum(draws)`` is the data's size, the epoch the sampler plans."""

    def __init__(self, buckets: List[List[Group]], draws: List[int]):
        self.buckets, self.draws = buckets, draws

    @classmethod
    def build(cls, bucket_groups: List[List[Tuple[GroupKey, np.ndarray]]], dataset_weights: Dict[int, float],
              category_weights: Dict[str, float]) -> "Mixture":
        present = {c for groups in bucket_groups for (_, c), _ in groups}
        if category_weights:
            missing = sorted(present - set(category_weights))
            if missing:
                raise UserInputError(f"--category_weights: no weight for categories {missing} (the data has "
                                     f"{sorted(present)}; give every one, 0 to leave it out)")
        buckets = []
        for groups in bucket_groups:
            sized = [(key, len(rows)) for key, rows in groups]
            shares = np.asarray(_shares(sized, dataset_weights, category_weights) if sized else [])
            if len(shares) and shares.sum() > 0:
                shares = shares / shares.sum()  # a dataset whose categories all weigh 0 gives its share away
            buckets.append([Group(key, rows, share) for (key, rows), share in zip(groups, shares)])
        return cls(buckets, _draws(buckets))

    @property
    def bucket_sizes(self) -> List[int]:
        """Sequences each bucket gives an epoch (``draws``)."""
        return list(self.draws)

    def epoch_order(self, seed: int, epoch: int, shuffle_buckets: bool) -> np.ndarray:
        """The epoch's row indices, bucket by bucket: each bucket's draws from its groups, shuffled (then all of
        them, with ``shuffle_buckets``). Written in place into one array of 4-byte indices; each shuffle is numpy's
        in-place one, which moves items exactly as indexing with ``permutation(n)`` did, so the order is the one
        earlier versions drew (their checkpoints resume at the same sample) without their int64 copies."""
        counts = [largest_remainder([g.share for g in groups], n) for groups, n in zip(self.buckets, self.draws)]
        order = np.empty(sum(int(c.sum()) for c in counts), dtype=row_index_dtype(sum(self.bucket_sizes)))
        start = 0
        for k, (groups, bucket_counts) in enumerate(zip(self.buckets, counts)):
            bucket = order[start:start + int(bucket_counts.sum())]
            at = 0
            for g, n in zip(groups, bucket_counts):
                bucket[at:at + n] = _stream(g.rows, [seed, k, g.key[0], zlib.crc32(g.key[1].encode())], epoch * n, n)
                at += n
            np.random.default_rng([seed, epoch, k]).shuffle(bucket)
            start += len(bucket)
        if shuffle_buckets:
            np.random.default_rng([seed, epoch]).shuffle(order)
        return order
