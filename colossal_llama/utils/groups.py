"""Items grouped by key in one sort: what per-key passes (``keys == key`` for each key) did in O(items x keys)."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np


def grouped_rows(keys: np.ndarray, start: int = 0, dtype=np.int64) -> Tuple[np.ndarray, List[np.ndarray]]:
    """The distinct ``keys`` (sorted) and, for each, the indices ``start + i`` of its items in ascending order,
    as ``dtype``. O(n log n) for n keys, whatever the number of distinct ones."""
    distinct, inverse = np.unique(np.asarray(keys), return_inverse=True)
    if not len(distinct):
        return distinct, []
    indices = (np.argsort(inverse.ravel(), kind="stable") + start).astype(dtype)
    return distinct, np.split(indices, np.cumsum(np.bincount(inverse.ravel(), minlength=len(distinct)))[:-1])
