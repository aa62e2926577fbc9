"""Right-padded batches for scoring.

Evaluation runs without an attention mask: with right padding the causal mask already keeps every real token
from seeing the pads that follow it (``benchmarks/eval_forward_mask.py`` checks the logits are identical).
"""
from __future__ import annotations

from typing import Sequence

import torch


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(len(rows), longest) int64 tensor: row i is ``rows[i]`` followed by ``pad_id``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out
