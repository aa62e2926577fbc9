"""Training set-up time against the number of categories: what train.py does with the rows' categories before
its first step, on every rank, with a replay mixture (``--dataset new:0.7 old:0.3``) and a held-out set.

- groups: the rows of each (``--dataset`` entry, category) of each bucket (``PreparedData.bucket_groups``);
- mixture: each group's share of its bucket (``Mixture.build``);
- epoch order: the sampler's order of epoch 0 (``Mixture.epoch_order``);
- validation plan: the held-out batches, category by category (``validation.batch_plan``).

Synthetic codes, nothing tokenised: ``--rows`` training rows in 10 buckets from 2 datasets, a tenth as many
held-out rows, categories drawn uniformly. A cost that grows with rows x categories shows as a time that grows
with the categories at a fixed number of rows (it was 37 s for the mixture at 4,000 categories and 2 M rows, and
89 s for the validation plan at 1,000 categories and 1 M held-out rows).

    python benchmarks/category_setup.py --rows 2000000 --categories 10 1000 4000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKETS = 10


def measure(rows: int, categories: int) -> dict:
    """Seconds of each set-up stage for ``rows`` training rows of ``categories`` categories."""
    from colossal_llama.training.data import PreparedData
    from colossal_llama.training.mixture import Mixture
    from colossal_llama.training.validation import batch_plan

    rng = np.random.default_rng(0)
    names = [f"category-{i:05d}" for i in range(categories)]
    data = PreparedData(None, [rows // BUCKETS] * BUCKETS, None, None, names,
                        rng.integers(0, categories, rows // BUCKETS * BUCKETS).astype(np.int16),
                        rng.integers(0, 2, rows // BUCKETS * BUCKETS).astype(np.int16))
    held_out = [names[c] for c in rng.integers(0, categories, rows // 10)]
    seconds = {}
    started = time.perf_counter()
    groups = data.bucket_groups()
    seconds["groups"] = time.perf_counter() - started
    started = time.perf_counter()
    mixture = Mixture.build(groups, {0: 0.7, 1: 0.3}, {})
    seconds["mixture"] = time.perf_counter() - started
    started = time.perf_counter()
    order = mixture.epoch_order(seed=42, epoch=0, shuffle_buckets=False)
    seconds["epoch order"] = time.perf_counter() - started
    started = time.perf_counter()
    batch_plan(held_out, 8, 100)
    seconds["validation plan"] = time.perf_counter() - started
    if len(order) != len(data.row_category):
        raise SystemExit(f"epoch order holds {len(order)} rows, the data {len(data.row_category)}")
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="training rows (held-out: a tenth as many)")
    parser.add_argument("--categories", type=int, nargs="+", default=[10, 1000, 4000])
    args = parser.parse_args(argv)
    stages = ["groups", "mixture", "epoch order", "validation plan"]
    print(f"{args.rows:,} training rows in {BUCKETS} buckets from 2 datasets, {args.rows // 10:,} held-out rows\n")
    print("| categories | " + " | ".join(f"{s} (s)" for s in stages) + " | total (s) | total / first row's |")
    print("|---|" + "---|" * (len(stages) + 2))
    first = None
    for categories in args.categories:
        seconds = measure(args.rows, categories)
        total = sum(seconds.values())
        first = first or total
        print(f"| {categories:,} | " + " | ".join(f"{seconds[s]:.2f}" for s in stages)
              + f" | {total:.2f} | {total / first:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
