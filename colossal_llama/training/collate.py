"""Batching packed rows: padding from lengths, and a block-diagonal causal mask from ``position_ids``.

Why not ``input_ids != pad``: in many tokenizers pad == eos, and real EOS tokens must stay visible. The mask is
built from each row's length and its document boundaries (``position_ids`` restart at 0 at every document
packed into the row), so packed documents never attend to each other.

Padding is treated as one extra "document" at the end of the row (its positions restart at 0 and it attends
only to itself), so no query row of the mask is empty (an all-masked row makes sdpa produce NaN) and it never
leaks into real tokens. Its labels are -100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from colossal_llama.utils.labels import IGNORE_INDEX


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids -> (B, L) document index per token (a new document starts wherever position is 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids -> (B, 1, L, L) bool mask, True where query i may attend key j.

    Invariant: True iff j <= i and tokens i, j belong to the same document. The diagonal is always True.
    """
    docs = document_ids(position_ids)
    same_doc = docs.unsqueeze(-1) == docs.unsqueeze(-2)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (same_doc & causal).unsqueeze(1)


@dataclass
class PackedCollator:
    """Rows ``{input_ids, labels, position_ids}`` (1-D, length L_i) -> padded tensors of shape (B, L).

    ``L = max L_i`` (``pad_to == "longest"``) or ``max_length``. Output keys: input_ids, labels, position_ids,
    attention_mask ((B, 1, L, L) bool, or absent when ``mask_4d`` is False: flash-attention and FlexAttention derive
    the document boundaries from position_ids on the device, see :mod:`colossal_llama.training.attention`),
    lengths (B,).
    """

    pad_token_id: int
    max_length: int
    pad_to: str = "longest"
    mask_4d: bool = True
    pad_multiple: int = 1  # sequence parallelism splits the padded length across ranks
    additive_mask_dtype: Optional[torch.dtype] = None  # the mask as 0 / -inf-like floats of this dtype (for
    # colossalai's sequence-parallel attention, which adds the mask to the scores: a bool mask would add 1 / 0)

    def __call__(self, rows: Sequence[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
        lengths = [len(r["input_ids"]) for r in rows]
        if max(lengths) > self.max_length:
            raise ValueError(f"a row has {max(lengths)} tokens, more than max_length {self.max_length}")
        width = self.max_length if self.pad_to == "max_length" else max(lengths)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            input_ids[i, :n] = torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(np.asarray(row["labels"]), dtype=torch.long)
            position_ids[i, :n] = torch.as_tensor(np.asarray(row["position_ids"]), dtype=torch.long)
            position_ids[i, n:] = torch.arange(width - n)  # padding: its own trailing "document"
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "lengths": torch.tensor(lengths, dtype=torch.long)}
        if "category_code" in rows[0]:  # training rows carry their category (per-category token accounting)
            out["category_codes"] = torch.tensor([int(r["category_code"]) for r in rows], dtype=torch.long)
        if self.mask_4d:
            mask = block_causal_mask(position_ids)
            if self.additive_mask_dtype is not None:
                blocked = torch.finfo(self.additive_mask_dtype).min
                mask = torch.zeros(mask.shape, dtype=self.additive_mask_dtype).masked_fill_(~mask, blocked)
            out["attention_mask"] = mask
        return out


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the (shifted) causal-LM loss: labels[:, 1:] != -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

