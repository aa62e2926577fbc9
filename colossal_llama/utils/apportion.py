"""Whole counts in given proportions (replay mixtures, corpus samples)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def largest_remainder(shares: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to ``total``, each within 1 of ``share x total`` (ties to the earlier group)."""
    if total > 0 and not np.sum(shares) > 0:  # nothing to apportion by: any answer would not sum to total
        raise ValueError(f"largest_remainder: {total} to share by shares that sum to {np.sum(shares)}")
    exact = np.asarray(shares, dtype=np.float64) * total
    counts = np.floor(exact).astype(np.int64)
    leftover = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts
